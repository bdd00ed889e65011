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

Metrics describe how far apart the two policies are, under verl's names and computed verl's
way (`rollout_corr_metrics`; verl's `verl/trainer/ppo/rollout_corr_helper.py`, read at commit
b178a3c, `compute_offpolicy_metrics` and `compute_is_metrics`), so that verl users read the
numbers they know: on the mask before rejection, IS statistics before truncation, ESS of the
weights clamped to [1/C, C]. Ours are kept only where verl has none: `is_weight_mean`, the
mean of the truncated weights the loss uses, after rejection.
Left out: per-token masking by vocabulary, and bias-corrected (unbiased) TIS variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qerl_rollout.rl.grpo import kl_penalty

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


_SAFETY = 20.0   # verl's SAFETY_BOUND: log-ratios are clamped to +-20 before exp


def rollout_corr_metrics(logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor,
                         level: str = "token", cap: float = 2.0) -> dict[str, float]:
    """verl's `rollout_corr/*` diagnostics of (B, T) logp_old (verl's "training") against
    logp_rollout on `mask` (before rejection); keys without the `rollout_corr/` prefix.

    With lr = logp_old - logp_rollout (log rho), token means over all valid tokens of the
    batch, per-row means m_i, and means over all B rows:
      kl = mean_t(-lr)                k3_kl = mean_t(exp(lr) - lr - 1)  (no clamp)
      chi2_token = mean_t(exp(2 lr)) - 1, chi2_seq = mean_i(exp(2 sum_t lr)) - 1  (lr clamped)
      training_ppl / rollout_ppl = mean_i exp(-m_i(logp))
      log_ppl_diff = mean_i d_i, log_ppl_abs_diff = mean_i |d_i|, ppl_ratio = mean_i exp(d_i),
        d_i = m_i(logp_rollout) - m_i(logp_old)
      rollout_is_mean: mean_t of the untruncated weight (token: rho_t; sequence: prod_t rho_t,
        broadcast); rollout_is_ratio_fraction_high / _low: weights above C / below 1/C
        (token level: of tokens; sequence level: of rows); rollout_is_eff_sample_size =
        1 / mean_t((w / mean_t w)^2) with w clamped to [1/C, C].
    verl has no geometric level: there the rollout_is_* keys are left out.
    """
    old, rollout = logp_old.detach().double(), logp_rollout.detach().double()
    m = mask.to(torch.float64)
    n = m.sum() + 1e-8

    def token_mean(x):
        return ((x * m).sum() / n).item()

    def row_mean(x):
        return (x * m).sum(-1) / (m.sum(-1) + 1e-8)

    lr = (old - rollout) * m
    d = row_mean(rollout) - row_mean(old)
    out = {
        "kl": token_mean(-lr), "k3_kl": token_mean(torch.exp(lr) - lr - 1),
        "chi2_token": token_mean(torch.exp(2 * lr.clamp(-_SAFETY, _SAFETY))) - 1.0,
        "chi2_seq": torch.exp(2 * lr.sum(-1).clamp(-_SAFETY, _SAFETY)).mean().item() - 1.0,
        "training_ppl": torch.exp(-row_mean(old)).mean().item(),
        "rollout_ppl": torch.exp(-row_mean(rollout)).mean().item(),
        "log_ppl_diff": d.mean().item(), "log_ppl_abs_diff": d.abs().mean().item(),
        "ppl_ratio": torch.exp(d).mean().item(),
    }
    if level not in ("token", "sequence"):
        return out
    if level == "token":
        w = torch.exp(lr.clamp(-_SAFETY, _SAFETY))
        high, low = token_mean((w > cap).double()), token_mean((w < 1 / cap).double())
    else:
        log_w = lr.sum(-1, keepdim=True)
        w = torch.exp(log_w.clamp(-_SAFETY, _SAFETY)).expand_as(lr)
        high = (log_w > torch.log(torch.tensor(cap))).double().mean().item()
        low = (log_w < -torch.log(torch.tensor(cap))).double().mean().item()
    clamped = w.clamp(1 / cap, cap)
    ess = 1.0 / token_mean((clamped / (token_mean(clamped) + 1e-8)) ** 2)
    out.update({"rollout_is_mean": token_mean(w), "rollout_is_ratio_fraction_high": high,
                "rollout_is_ratio_fraction_low": low, "rollout_is_eff_sample_size": ess})
    return out


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


def weight_metrics(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and max of the truncated weights the loss uses, over the tokens left after
    rejection (verl has no such key: its rollout_is_mean is before truncation)."""
    on = mask.bool()
    if not on.any():
        return {"is_weight_mean": 0.0, "is_weight_max": 0.0}
    w = weights[on]
    return {"is_weight_mean": w.mean().item(), "is_weight_max": w.max().item()}


def correct_mismatch(
    logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, cfg: MismatchConfig
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """-> (is_weights (B, T) or None when level == "none", mask after rejection, metrics).

    Metrics: `rollout_corr/*` (verl's, `rollout_corr_metrics`, before rejection and
    truncation), `rollout_corr/rollout_rs_masked_fraction` (verl's: the token fraction
    rejected) and our `is_weight_mean` / `is_weight_max` of the weights the loss uses.
    """
    metrics = {f"rollout_corr/{k}": v for k, v in
               rollout_corr_metrics(logp_old, logp_rollout, mask, cfg.level, cfg.cap).items()}
    kept = rejection_mask(logp_old, logp_rollout, mask, cfg)
    metrics["rollout_corr/rollout_rs_masked_fraction"] = 1.0 - kept.sum().item() / max(mask.sum().item(), 1.0)
    if cfg.level == "none":
        return None, kept, metrics
    weights, _ = importance_weights(logp_old, logp_rollout, kept, cfg.level, cfg.cap)
    metrics.update(weight_metrics(weights, kept))
    return weights, kept, metrics
