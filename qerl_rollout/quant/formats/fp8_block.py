"""fp8_block: float8_e4m3fn weights with one scale per 128x128 block (compressed-tensors FP8_BLOCK).

How it works: scale = amax(block) / 448 in the weight dtype (a zero scale becomes that
dtype's eps, as in compressed-tensors), w_fp8 = e4m3(w / scale). Blocks at the bottom/right
edge may be partial: they are quantized as if zero-padded to 128x128, like compressed-tensors,
so the scale is (ceil(N/128), ceil(K/128)). Stored as `weight` (fp8, (N, K)) and
`weight_scale` (weight dtype). Activations are quantized dynamically per 128-group by vLLM;
nothing here does that.
"""

from __future__ import annotations

from typing import Any

import torch

from qerl_rollout.quant import kernels
from qerl_rollout.quant.formats.registry import QuantScheme, float_args, register

BLOCK = (128, 128)


@register
class Fp8Block(QuantScheme):
    name = "fp8_block"
    format = "float-quantized"
    preset = "FP8_BLOCK"
    keys = ("weight", "weight_scale")
    triton_runner = "fp8_blocks"
    block_width = 128
    block_rows = 128
    gpu_capability = (8, 9)
    gpu_kernel = "FP8 W8A8"

    def nbytes(self, n: int, k: int) -> int:
        return n * k + -(-n // BLOCK[0]) * -(-k // BLOCK[1]) * 2       # fp8 + one bf16 scale per block

    def quantize(self, w_3d: torch.Tensor, global_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
        w_fp8, scale = kernels.fp8(w_3d, BLOCK)
        return {"weight": w_fp8, "weight_scale": scale}

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        w = kernels.fp8_dequantize(tensors["weight"], tensors["weight_scale"], BLOCK)
        return w.to(dtype)

    def scheme_args(self) -> dict[str, Any]:
        return {
            "weights": float_args(strategy="block", block_structure=list(BLOCK), observer="memoryless_minmax"),
            "input_activations": float_args(strategy="group", group_size=128, dynamic=True),
        }
