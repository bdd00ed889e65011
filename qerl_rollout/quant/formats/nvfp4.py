"""nvfp4: E2M1 weights packed two per byte, e4m3 scale per 16 values, fp32 global scale
(compressed-tensors NVFP4A16, format "nvfp4-pack-quantized").

How it works: global_scale = 448*6 / amax(w) computed in the weight dtype, then fp32 (from
`global_amax` instead when given, so fused q/k/v or gate/up share one); per group of 16 along
K, scale = e4m3(global_scale * amax(group)/6) (zero -> 0.125); codes = E2M1(w / (scale /
global_scale)), ties to even; byte = code[2j] | code[2j+1] << 4 (even column in the low nibble).
Stored as `weight_packed` (uint8, (N, K/2)), `weight_scale` (e4m3, (N, K/16)) and
`weight_global_scale` (fp32, (1,)) -- the global scale itself, not its reciprocal, as
compressed-tensors writes it. K must be a multiple of 16: compressed-tensors rejects partial
groups, so this does too.
"""

from __future__ import annotations

from typing import Any

import torch

from qerl_rollout.quant import kernels
from qerl_rollout.quant.formats.registry import QuantScheme, float_args, register

GROUP = 16


@register
class Nvfp4(QuantScheme):
    name = "nvfp4"
    format = "nvfp4-pack-quantized"
    preset = "NVFP4A16"
    keys = ("weight_packed", "weight_scale", "weight_global_scale")
    triton_runner = "nvfp4_groups"
    block_width = 16
    group_global_scale = True
    gpu_capability = (8, 0)
    gpu_kernel = "NVFP4 (Marlin)"

    def nbytes(self, n: int, k: int) -> int:
        return n * k // 2 + n * (k // GROUP) + 4                        # e2m1 pairs, e4m3 per 16, fp32 global

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        if shape[-1] % GROUP:
            raise ValueError(
                f"nvfp4 needs the last dim divisible by {GROUP} (compressed-tensors rejects "
                f"partial groups), got shape {tuple(shape)}"
            )

    def global_scale(self, w_3d: torch.Tensor, global_amax: torch.Tensor | None) -> torch.Tensor:
        """(E,) fp32: from each expert's own amax, or from global_amax (scalar or (E,))."""
        if global_amax is None:
            amax = kernels.absmax(w_3d)
        else:
            amax = global_amax.to(device=w_3d.device, dtype=w_3d.dtype).reshape(-1)
            amax = amax.expand(w_3d.shape[0])
        return kernels.reference.nvfp4_global_scale(amax)

    def quantize(self, w_3d: torch.Tensor, global_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
        global_scale = self.global_scale(w_3d, global_amax)
        packed, scale = kernels.nvfp4(w_3d, global_scale)
        return {
            "weight_packed": packed,
            "weight_scale": scale,
            "weight_global_scale": global_scale.reshape(-1, 1),
        }

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        global_scale = tensors["weight_global_scale"].reshape(-1)
        return kernels.nvfp4_dequantize(
            tensors["weight_packed"], tensors["weight_scale"], global_scale, dtype
        )

    def scheme_args(self) -> dict[str, Any]:
        weights = float_args(
            num_bits=4, strategy="tensor_group", group_size=GROUP,
            scale_dtype="torch.float8_e4m3fn", observer="memoryless_minmax",
        )
        return {"weights": weights, "input_activations": None}
