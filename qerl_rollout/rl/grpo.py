"""GRPO math as pure torch functions: group advantages, the PPO-clip policy loss, KL, entropy.

Every function takes plain tensors and returns tensors (plus a dict of float metrics where a
trainer wants to log something); none holds state, touches a model, or imports ray or vllm, so
users can call them from their own trainers. Shapes, with B responses and T response tokens:

- rewards, advantages: (B,), one scalar per response; the `group_size` responses of one prompt
  are contiguous (rows [0, G) are prompt 0, [G, 2G) prompt 1, ...).
- logp, logp_old, logp_ref, is_weights, mask: (B, T); `mask` is 1 on response tokens that count
  and 0 on padding (and on tokens a rejection rule dropped). Prompt tokens are never in (B, T).

The loss follows verl's `compute_policy_loss_vanilla` (an oracle test holds them equal), with two
deliberate differences: dual-clip (verl's `clip_ratio_c`) is off unless `clip_c` is given, and
the ratio is clamped to exp(+-20) the same way. Aggregation modes are verl's names:
"token-mean" (DAPO), "seq-mean-token-mean" (original GRPO), "seq-mean-token-sum",
"seq-mean-token-sum-norm" (Dr.GRPO: divide by a constant horizon instead of lengths).
Left out: value functions / GAE, and sequence-level (GSPO) ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class GRPOConfig:
    """Knobs of the GRPO objective (advantages + loss)."""

    group_size: int = 8
    norm_adv_by_std: bool = True  # False: Dr.GRPO (mean-centred only)
    adv_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher; set equal to clip_low for symmetric PPO
    clip_c: float | None = None  # dual-clip bound (>1) for negative advantages; None: off
    agg: str = "token-mean"
    kl_coef: float = 0.0  # 0: no reference forward pass at all
    # Dr.GRPO's constant ("seq-mean-token-sum-norm"): the generation budget, not the batch's
    # padded length, which changes from step to step. 0: the trainer's max_tokens (train.py).
    horizon: int = 0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0

    def __post_init__(self):
        if self.agg not in AGG_MODES:
            raise ValueError(f"agg={self.agg!r}; choose from {AGG_MODES}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}; choose from {KL_ESTIMATORS}")
        if self.horizon < 0:
            raise ValueError(f"horizon must be >= 0 (0: max_tokens), got {self.horizon}")


def group_advantages(
    rewards: torch.Tensor, group_size: int, norm_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """(B,) rewards, groups contiguous -> (B,) advantages (r - mean_g) [/ (std_g + eps)].

    std is the unbiased (n-1) standard deviation, as verl computes it. A group of one response
    gets mean 0 and std 1 (verl's convention), so its advantage is its reward. Non-finite
    rewards (a reward function's NaN) are left out: the group's mean and std come from its
    finite rewards, and those samples get advantage 0, so they add no gradient.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} is not (B,) with B % {group_size} == 0")
    grouped = rewards.float().view(-1, group_size)
    finite = torch.isfinite(grouped)
    if not bool(finite.all()):
        return _advantages_of_finite(grouped, finite, norm_std, eps).view(-1)
    if group_size == 1:
        mean, std = torch.zeros_like(grouped), torch.ones_like(grouped)
    else:
        mean = grouped.mean(dim=1, keepdim=True)
        std = grouped.std(dim=1, keepdim=True, unbiased=True)
    centred = grouped - mean
    advantages = centred / (std + eps) if norm_std else centred
    return advantages.view(-1)


def _advantages_of_finite(grouped, finite, norm_std: bool, eps: float) -> torch.Tensor:
    values = torch.where(finite, grouped, 0.0)
    count = finite.sum(dim=1, keepdim=True)
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)
    var = (torch.where(finite, grouped - mean, 0.0) ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), 1.0)
    centred = torch.where(finite, grouped - mean, 0.0)
    return centred / (std + eps) if norm_std else centred


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    horizon: int | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    `num_tokens` / `num_seqs` override the denominators: a trainer that splits one batch into
    micro-batches passes the whole batch's counts, so the micro-batch losses sum to the batch
    loss. Fully masked sequences do not count as sequences. `horizon` is the constant of
    "seq-mean-token-sum-norm" (default T).
    """
    mask = mask.to(loss_mat.dtype)
    if agg == "token-mean":
        denom = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
        return (loss_mat * mask).sum() / denom
    seq_tokens = mask.sum(dim=-1)
    seq_alive = (seq_tokens > 0).to(loss_mat.dtype)
    seq_denom = seq_alive.sum().clamp(min=1) if num_seqs is None else num_seqs
    seq_sums = (loss_mat * mask).sum(dim=-1)
    if agg == "seq-mean-token-mean":
        return (seq_sums / (seq_tokens + 1e-8) * seq_alive).sum() / seq_denom
    if agg == "seq-mean-token-sum":
        return (seq_sums * seq_alive).sum() / seq_denom
    if agg == "seq-mean-token-sum-norm":
        return (seq_sums * seq_alive).sum() / seq_denom / (horizon or mask.shape[-1])
    raise ValueError(f"agg={agg!r}; choose from {AGG_MODES}")


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    is_weights: torch.Tensor | None = None,
    clip_c: float | None = None,
    **agg_kwargs,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss with separate low/high clip. Token tensors (B, T), advantages (B,) or (B, T).

    per token: max(-A r, -A clip(r, 1-clip_low, 1+clip_high)), r = exp(logp - logp_old);
    with `clip_c`, tokens with A < 0 are further capped at -A clip_c (dual-clip).
    `is_weights` (B, T), e.g. truncated importance weights, multiply the clipped per-token
    objective and carry no gradient. Returns (scalar loss, metrics).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    log_ratio = torch.clamp(logp - logp_old, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    metrics = {
        "pg_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask).item(),
        "ppo_kl": masked_mean(-log_ratio, mask).item(),
    }
    if clip_c is not None:
        if clip_c <= 1.0:
            raise ValueError(f"clip_c must be > 1, got {clip_c}")
        capped = torch.minimum(per_token, -adv * clip_c)
        lower_hit = (per_token > -adv * clip_c) & (adv < 0)
        metrics["pg_clipfrac_lower"] = masked_mean(lower_hit.float(), mask).item()
        per_token = torch.where(adv < 0, capped, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate(per_token, mask, agg, **agg_kwargs)
    return loss, metrics


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, (B, T) -> (B, T).

    k1 = logp - logp_ref (unbiased, high variance, can be negative);
    k2 = (logp - logp_ref)^2 / 2; k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1 (>= 0,
    unbiased, low variance; Schulman 2020). k3 is clamped to [-10, 10] as in verl.
    """
    if estimator == "k1":
        return logp - logp_ref
    if estimator == "k2":
        return 0.5 * (logp - logp_ref).square()
    if estimator == "k3":
        delta = torch.clamp(logp_ref - logp, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(delta) - delta - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"estimator={estimator!r}; choose from {KL_ESTIMATORS}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the softmax, computed in fp32."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOConfig,
    is_weights: torch.Tensor | None = None,
    logp_ref: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    **agg_kwargs,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The full objective: policy loss + kl_coef * KL(logp, logp_ref) - entropy_coef * entropy.

    All three terms use the same aggregation `cfg.agg` (and `agg_kwargs` denominators). KL needs
    `logp_ref` when `cfg.kl_coef > 0`; the entropy bonus needs `entropy` (B, T) when
    `cfg.entropy_coef > 0`. Either may be passed anyway, for the metric alone.
    """
    loss, metrics = policy_loss(
        logp, logp_old, advantages, mask, cfg.clip_low, cfg.clip_high, cfg.agg,
        is_weights=is_weights, clip_c=cfg.clip_c, **agg_kwargs,
    )
    metrics["pg_loss"] = loss.item()
    if cfg.kl_coef > 0 and logp_ref is None:
        raise ValueError("kl_coef > 0 needs logp_ref")
    if logp_ref is not None:
        kl = aggregate(kl_penalty(logp, logp_ref, cfg.kl_estimator), mask, cfg.agg, **agg_kwargs)
        metrics["kl"] = kl.item()
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy")
    if entropy is not None:
        ent = aggregate(entropy, mask, cfg.agg, **agg_kwargs)
        metrics["entropy"] = ent.item()
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * ent
    return loss, metrics
