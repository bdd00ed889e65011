"""Dataclass configs shared across packages.

Only the configs that several packages need live here; each package keeps its own small
dataclasses next to the code that reads them. Every config validates itself in
`__post_init__`, so a bad value fails where it is written, not deep inside a run.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANT_SCHEMES = ("bf16", "fp8_block", "fp8_channel", "nvfp4")
QUANT_MODES = ("auto", "kernel", "emulate")


@dataclass(frozen=True)
class QuantConfig:
    """How the rollout engine holds the policy.

    scheme: `bf16` (no quantization) or a scheme of `qerl_rollout.quant`.
    mode:   `kernel` runs vLLM's quantized layers and receives compressed tensors;
            `emulate` runs BF16 layers that hold the dequantized (QDQ) values, so the numbers
            are those of the quantized model but not its speed; `auto` picks kernel where the
            platform has the kernels and emulate elsewhere (`resolve_mode`).
    """

    scheme: str = "fp8_block"
    mode: str = "auto"

    def __post_init__(self):
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(f"unknown quant scheme {self.scheme!r}; choose from {QUANT_SCHEMES}")
        if self.mode not in QUANT_MODES:
            raise ValueError(f"unknown quant mode {self.mode!r}; choose from {QUANT_MODES}")

    @property
    def quantized(self) -> bool:
        return self.scheme != "bf16"
