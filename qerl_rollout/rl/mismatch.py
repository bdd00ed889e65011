"""Rollout/training mismatch correction: truncated importance sampling and rejection.

The rollout engine samples from pi_rollout (a quantized copy, other kernels); the trainer
scores the same tokens with pi_old (BF16 + LoRA, before the update). The policy gradient is an
expectation under pi_old, so each sampled token is reweighted by rho = pi_old / pi_rollout:

- "token" (default, FlashRL / verl TIS): w_t = min(rho_t, C), C = 2.
- "sequence": one weight per response, w = min(prod_t rho_t, C), broadcast over its tokens.
- "geometric": w = min(exp(mean_t log rho_t), C) — the length-normalized sequence ratio.

Rejection drops instead of reweighting: with `reject="token"` tokens whose rho is outside
[reject_low, reject_high] leave the mask; with `reject="sequence"` whole responses whose
geometric-mean ratio is outside the band do. Rejection and weighting combine.

All inputs are (B, T) response-token tensors (see `rl.grpo`); nothing here carries gradient.
Metrics describe how far apart the two policies are: KL(pi_rollout || pi_old) estimated with
k1 and k3 on the sampled tokens, weight mean/max, the fraction of truncated weights, the
effective sample size ESS = (sum w)^2 / (N sum w^2) in (0, 1], and the rejected fraction.
Left out: per-token masking by vocabulary, and bias-corrected (unbiased) TIS variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qerl_rollout.rl.grpo import kl_penalty, masked_mean

IS_LEVELS = ("none", "token", "sequence", "geometric")
REJECT_MODES = ("none", "token", "sequence")


@dataclass
class MismatchConfig:
    """Importance weighting and rejection against the rollout log-probs (on by default)."""

    level: str = "token"
    cap: float = 2.0  # C in min(rho, C)
    reject: str = "none"
    reject_low: float = 0.5
    reject_high: float = 2.0

    def __post_init__(self):
        if self.level not in IS_LEVELS:
            raise ValueError(f"level={self.level!r}; choose from {IS_LEVELS}")
        if self.reject not in REJECT_MODES:
            raise ValueError(f"reject={self.reject!r}; choose from {REJECT_MODES}")
        if not 0 < self.reject_low < 1 < self.reject_high:
            raise ValueError("need 0 < reject_low < 1 < reject_high")


def log_ratio(logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor):
    """(B, T) log rho = logp_old - logp_rollout, zero on masked positions, clamped to +-20."""
    delta = (logp_old - logp_rollout).detach().float()
    return torch.clamp(delta, -20.0, 20.0) * mask.to(delta.dtype)


def sequence_log_ratio(token_log_ratio: torch.Tensor, mask: torch.Tensor, mean: bool):
    """(B, T) token log-ratios -> (B, 1) sum (or mean, if `mean`) over each response's tokens."""
    total = token_log_ratio.sum(dim=-1, keepdim=True)
    if not mean:
        return total
    return total / mask.sum(dim=-1, keepdim=True).clamp(min=1).to(total.dtype)


def importance_weights(
    logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, level: str, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs -> ((B, T) weights min(rho, cap) zeroed off the mask, (B, T) raw rho)."""
    token_lr = log_ratio(logp_old, logp_rollout, mask)
    if level == "token":
        rho = torch.exp(token_lr)
    elif level in ("sequence", "geometric"):
        seq_lr = sequence_log_ratio(token_lr, mask, mean=level == "geometric")
        rho = torch.exp(torch.clamp(seq_lr, -20.0, 20.0)).expand_as(token_lr)
    else:
        raise ValueError(f"level={level!r}; choose from {IS_LEVELS}")
    weights = torch.clamp(rho, max=cap) * mask.to(rho.dtype)
    return weights, rho


def rejection_mask(
    logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, cfg: MismatchConfig
) -> torch.Tensor:
    """(B, T) mask with the tokens (or whole responses) outside the ratio band set to 0."""
    if cfg.reject == "none":
        return mask
    token_lr = log_ratio(logp_old, logp_rollout, mask)
    if cfg.reject == "token":
        lr = token_lr
    else:
        lr = sequence_log_ratio(token_lr, mask, mean=True).expand_as(token_lr)
    low, high = torch.log(torch.tensor(cfg.reject_low)), torch.log(torch.tensor(cfg.reject_high))
    keep = (lr >= low) & (lr <= high)
    return mask * keep.to(mask.dtype)


def mismatch_metrics(
    logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """KL(pi_rollout || pi_old) on the sampled tokens, k1 and k3 estimators, token-mean."""
    old, rollout = logp_old.detach().float(), logp_rollout.detach().float()
    return {
        "mismatch_kl_k1": masked_mean(kl_penalty(rollout, old, "k1"), mask).item(),
        "mismatch_kl_k3": masked_mean(kl_penalty(rollout, old, "k3"), mask).item(),
    }


def quantization_cost(logp_quant: list[list[float]], logp_bf16: list[list[float]]) -> dict[str, float]:
    """What quantization costs, on tokens a quantized engine sampled at temperature 1 and a BF16
    engine with the same weights scored: KL(pi_quant || pi_bf16) by k1 (unbiased: the tokens are
    drawn from pi_quant) and k3, and the mean / max |logp_quant - logp_bf16| per token."""
    if len(logp_quant) != len(logp_bf16) or any(len(a) != len(b) for a, b in zip(logp_quant, logp_bf16)):
        raise ValueError("logp_quant and logp_bf16 must hold the same tokens")
    quant = torch.tensor([x for row in logp_quant for x in row], dtype=torch.float64)
    bf16 = torch.tensor([x for row in logp_bf16 for x in row], dtype=torch.float64)
    if quant.numel() == 0:
        raise ValueError("no tokens to compare")
    gap = (quant - bf16).abs()
    return {"kl_k1": kl_penalty(quant, bf16, "k1").mean().item(),
            "kl_k3": kl_penalty(quant, bf16, "k3").mean().item(),
            "logp_gap_mean": gap.mean().item(), "logp_gap_max": gap.max().item()}


def weight_metrics(weights: torch.Tensor, rho: torch.Tensor, mask: torch.Tensor, cap: float):
    """Mean/max of the weights, fraction truncated at `cap`, ESS over the mask's tokens."""
    on = mask.bool()
    if not on.any():
        return {"is_weight_mean": 0.0, "is_weight_max": 0.0, "is_clipped_frac": 0.0, "is_ess": 0.0}
    w = weights[on]
    ess = w.sum().square() / (w.numel() * w.square().sum()).clamp(min=1e-12)
    return {
        "is_weight_mean": w.mean().item(),
        "is_weight_max": w.max().item(),
        "is_clipped_frac": (rho[on] > cap).float().mean().item(),
        "is_ess": ess.item(),
    }


def correct_mismatch(
    logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, cfg: MismatchConfig
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """-> (is_weights (B, T) or None when level == "none", mask after rejection, metrics)."""
    metrics = mismatch_metrics(logp_old, logp_rollout, mask)
    kept = rejection_mask(logp_old, logp_rollout, mask, cfg)
    metrics["rejected_frac"] = 1.0 - kept.sum().item() / max(mask.sum().item(), 1.0)
    if cfg.level == "none":
        return None, kept, metrics
    weights, rho = importance_weights(logp_old, logp_rollout, kept, cfg.level, cfg.cap)
    metrics.update(weight_metrics(weights, rho, kept, cfg.cap))
    return weights, kept, metrics
