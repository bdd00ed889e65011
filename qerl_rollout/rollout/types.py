"""The rollout side's small types, free of vLLM (and of the run config) so that anything can
import them: `QuantConfig` (how an engine holds the policy), `Sample` (what generation
returns) and `EngineStateError`. What a weight sync needs from an engine is
`wire.receiver.WeightReceiver`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qerl_rollout.quant import DEFAULT_SCHEME, SCHEMES
from qerl_rollout.quant.plan import Precision

QUANT_SCHEMES = ("bf16", *SCHEMES)
QUANT_MODES = ("auto", "kernel", "emulate")


@dataclass(frozen=True)
class QuantConfig:
    """How the rollout engine holds the policy.

    scheme: `bf16` (no quantization) or a scheme of `qerl_rollout.quant`.
    mode:   `kernel` runs vLLM's quantized layers and receives compressed tensors;
            `emulate` runs BF16 layers that hold the dequantized (QDQ) values, so the numbers
            are those of the quantized model but not its speed; `auto` picks kernel where the
            platform has the kernels and emulate elsewhere (`resolve_mode`).
    precision: which quantizable layers get the scheme, the rest BF16 (`quant.plan.Precision`).
    """

    scheme: str = DEFAULT_SCHEME
    mode: str = "auto"
    precision: Precision = Precision()

    def __post_init__(self):
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(f"unknown quant scheme {self.scheme!r}; choose from {QUANT_SCHEMES}")
        if self.mode not in QUANT_MODES:
            raise ValueError(f"unknown quant mode {self.mode!r}; choose from {QUANT_MODES}")
        if self.precision.overrides and not self.quantized:
            raise ValueError("quant_overrides give module kinds another scheme than rollout.scheme; "
                             "the bf16 scheme quantizes nothing")

    @property
    def quantized(self) -> bool:
        return self.scheme != "bf16"

    @property
    def schemes(self) -> tuple[str, ...]:
        """Every scheme the engine holds: `scheme`, then its overrides' (`Precision.overrides`)."""
        extra = [s for s in self.precision.override_schemes if s != self.scheme]
        return (self.scheme, *extra)


@dataclass
class Sample:
    """One generated response.

    token_ids: generated tokens (prompt excluded).
    logprobs:  per generated token, the log-probability of the sampled token under the
               engine's weights and sampling distribution (after temperature / top-p).
    version:   the weight version that produced it.
    routes:    None, or the experts the engine routed each token to: a (tokens, moe_layers, k)
               int16 numpy array over the prompt then the response tokens, MoE layers in
               model order (`generate(routes=True)`; `rl.routing` replays or compares them).
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    version: int
    finish_reason: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)
    routes: object = field(default=None, repr=False, compare=False)


class EngineStateError(RuntimeError):
    """The engine holds a partial weight update and refuses to serve until a push completes."""
