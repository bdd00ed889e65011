"""Adaptive quantization noise (QeRL's AQN), as a transform over a weight stream.

QeRL adds Gaussian noise to the RMSNorm weights of the *rollout* model to raise policy entropy
and so exploration; the trainer's weights never see it. Here that is a generator over the
`(name, tensor)` pairs the weight sync streams to the engine: norm weights come out as new
tensors w + N(0, sigma^2) (one draw per channel), everything else passes through untouched, and
no input tensor is ever mutated.

Schedule (as in QeRL's `get_sigma_by_step`): the run's `total_steps` are cut into K equal
intervals. Interval 0 has sigma = 0; interval k in 1..K-1 has
sigma_start * (sigma_end / sigma_start) ** ((k - 1) / (K - 2)), so interval 1 has sigma_start
and interval K-1 has sigma_end. Defaults 1e-2 -> 1e-4 over K = 10.

Which tensors: 1-D weights whose module name contains one of `include` ("norm" matches
input_layernorm, post_attention_layernorm, q_norm/k_norm and the final norm) and none of
`exclude` (e.g. ("input_layernorm",) keeps the router's input exact in MoE layers).
Noise is drawn in fp32 on the CPU from the caller's generator (reproducible) and the sum is
rounded back to the weight's dtype; note that a BF16 weight near 1.0 has a spacing of 2^-7, so
a sigma far below that is mostly rounded away unless the engine keeps norms in fp32.
Left out: noise on other tensors, and merging the noise into quantized scales (QeRL's
inference-time folding); the sync decides where the stream goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class AQNConfig:
    """Adaptive quantization noise on the rollout copy's norm weights (off by default)."""

    enabled: bool = False
    sigma_start: float = 1e-2
    sigma_end: float = 1e-4
    num_intervals: int = 10  # K; interval 0 is noise-free
    include: tuple[str, ...] = ("norm",)
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.num_intervals < 3:
            raise ValueError("num_intervals (K) must be >= 3: one silent interval and a decay")
        if not 0 < self.sigma_end <= self.sigma_start:
            raise ValueError("need 0 < sigma_end <= sigma_start")


def aqn_sigma(
    step: int,
    total_steps: int,
    sigma_start: float = 1e-2,
    sigma_end: float = 1e-4,
    num_intervals: int = 10,
) -> float:
    """Noise std at `step` (0-based) of `total_steps`: 0 in the first of K intervals, then geometric."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    step = min(max(step, 0), total_steps)
    interval = min(int(step * num_intervals // total_steps), num_intervals - 1)
    if interval == 0:
        return 0.0
    exponent = (interval - 1) / (num_intervals - 2)
    return sigma_start * (sigma_end / sigma_start) ** exponent


def is_noise_target(name: str, tensor: torch.Tensor, include=("norm",), exclude=()) -> bool:
    """True for a 1-D `*.weight` whose module name has an `include` part and no `exclude` part."""
    if tensor.dim() != 1 or not name.endswith(".weight"):
        return False
    module = name[: -len(".weight")]
    return any(s in module for s in include) and not any(s in module for s in exclude)


def apply_aqn(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    sigma: float,
    generator: torch.Generator | None = None,
    include: tuple[str, ...] = ("norm",),
    exclude: tuple[str, ...] = (),
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the stream with noise N(0, sigma^2) added to norm weights (new tensors, inputs intact).

    With sigma == 0 the stream passes through unchanged (same tensor objects).
    """
    for name, tensor in named_tensors:
        if sigma == 0 or not is_noise_target(name, tensor, include, exclude):
            yield name, tensor
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * sigma
        noisy = tensor.detach().float() + noise.to(tensor.device)
        yield name, noisy.to(tensor.dtype)


def aqn_stream(
    named_tensors: Iterable[tuple[str, torch.Tensor]], step: int, total_steps: int, cfg: AQNConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """The sync's entry point: AQN at `step` with its own generator seeded by (cfg.seed, step)."""
    if not cfg.enabled:
        yield from named_tensors
        return
    sigma = aqn_sigma(step, total_steps, cfg.sigma_start, cfg.sigma_end, cfg.num_intervals)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    yield from apply_aqn(named_tensors, sigma, generator, cfg.include, cfg.exclude)


@dataclass(frozen=True)
class NormNoise:
    """The AQN of one push: its sigma and the seed of its draw. Small and picklable: the loop
    computes it once per push (`norm_noise`) and every trainer rank builds the same transform
    from it, so all ranks (and a re-push) draw the same noise."""

    sigma: float
    seed: int
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    def transform(self):
        """The weight sync's `norm_transform`: included norm weights -> w + N(0, sigma^2)."""
        gen = torch.Generator().manual_seed(self.seed)

        def noise(name, tensor):
            return next(apply_aqn([(name, tensor)], self.sigma, gen, self.include, self.exclude))[1]

        return noise


def norm_noise(cfg: AQNConfig, total_steps: int, next_step: int) -> NormNoise | None:
    """The AQN of the push that serves 0-based step `next_step`, or None (AQN off, or a
    noise-free interval); seeded by (cfg.seed, next_step)."""
    if not cfg.enabled:
        return None
    sigma = aqn_sigma(next_step, total_steps, cfg.sigma_start, cfg.sigma_end, cfg.num_intervals)
    if sigma <= 0:
        return None
    return NormNoise(sigma, cfg.seed * 1_000_003 + next_step, tuple(cfg.include), tuple(cfg.exclude))
