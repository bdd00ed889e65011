"""int8: symmetric int8 weights with one scale per output row (compressed-tensors W8A8 / INT8).

How it works: scale = amax(row) / 127.5 in the weight dtype (compressed-tensors divides the
largest magnitude by half the int8 range, (127 - -128) / 2; a zero scale becomes that dtype's
eps), w_int8 = round_half_even(clamp(w / scale in the weight dtype + 0, -128, 127)). The
division is rounded to the weight dtype before the integer rounding, exactly as torch does it
in compressed-tensors' `quantize`, so a value can land on a .5 only after that first rounding.
Stored as `weight` (int8, (N, K)) and `weight_scale` ((N, 1), in the weight dtype).
Activations are quantized dynamically per token to int8 by vLLM (the W8A8 preset's
`input_activations`); nothing here does that. Because -128 is only reached by a value of
-128.5 or below after rounding, and |w / scale| <= 127.5, -128 appears only at exact ties.
"""

from __future__ import annotations

from typing import Any

import torch

from qerl_rollout.quant import kernels
from qerl_rollout.quant.formats.registry import QuantScheme, int_args, register


@register
class Int8(QuantScheme):
    name = "int8"
    format = "int-quantized"
    preset = "W8A8"
    keys = ("weight", "weight_scale")
    triton_runner = "int8_rows"
    gpu_capability = (7, 5)
    gpu_kernel = "INT8 W8A8 (CUTLASS)"
    cpu_kernel = True

    def nbytes(self, n: int, k: int) -> int:
        return n * k + n * 2                                            # int8 + one bf16 scale per row

    def quantize(self, w_3d: torch.Tensor, global_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
        w_int8, scale = kernels.int8(w_3d)  # scale: (E, N, 1)
        return {"weight": w_int8, "weight_scale": scale}

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return kernels.int8_dequantize(tensors["weight"], tensors["weight_scale"]).to(dtype)

    def scheme_args(self) -> dict[str, Any]:
        return {
            "weights": int_args(strategy="channel", observer="memoryless_minmax"),
            "input_activations": int_args(strategy="token", dynamic=True),
        }
