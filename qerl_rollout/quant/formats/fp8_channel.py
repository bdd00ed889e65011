"""fp8_channel: float8_e4m3fn weights with one scale per output row (compressed-tensors FP8_DYNAMIC).

How it works: scale = amax(row) / 448 in the weight dtype (zero -> that dtype's eps),
w_fp8 = e4m3(w / scale). Stored as `weight` (fp8, (N, K)) and `weight_scale` ((N, 1), in the
weight dtype: compressed-tensors registers the scale parameter in the weight's dtype and sets
no scale_dtype for this preset). Activations are quantized dynamically per token by vLLM.
"""

from __future__ import annotations

from typing import Any

import torch

from qerl_rollout.quant import kernels
from qerl_rollout.quant.formats.registry import QuantScheme, float_args, register


@register
class Fp8Channel(QuantScheme):
    name = "fp8_channel"
    format = "float-quantized"
    preset = "FP8_DYNAMIC"
    keys = ("weight", "weight_scale")
    triton_runner = "fp8_rows"
    gpu_capability = (8, 9)
    gpu_kernel = "FP8 W8A8"

    def nbytes(self, n: int, k: int) -> int:
        return n * k + n * 2                                            # fp8 + one bf16 scale per row

    def quantize(self, w_3d: torch.Tensor, global_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
        w_fp8, scale = kernels.fp8(w_3d, (1, w_3d.shape[-1]))  # scale: (E, N, 1)
        return {"weight": w_fp8, "weight_scale": scale}

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        w_fp8 = tensors["weight"]
        w = kernels.fp8_dequantize(w_fp8, tensors["weight_scale"], (1, w_fp8.shape[-1]))
        return w.to(dtype)

    def scheme_args(self) -> dict[str, Any]:
        return {
            "weights": float_args(strategy="channel", observer="memoryless_minmax"),
            "input_activations": float_args(strategy="token", dynamic=True),
        }
