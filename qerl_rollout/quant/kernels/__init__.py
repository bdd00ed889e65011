"""Kernel dispatch: the C++ fast path on CPU (`cpu.py`), the plain torch twin elsewhere.

`fp8`, `nvfp4` and `absmax` take a finite (E, N, K) weight and return the same bits whichever
backend runs, and so do `fp8_dequantize` / `nvfp4_dequantize` (what an emulate-mode engine
runs on every pushed layer); tests hold `cpu` and `reference` equal. The fast path checks finiteness as it
reads (NaN/Inf -> ValueError); the twin is preceded by an explicit check. `ct_oracle.py` is
compressed-tensors itself, for tests and benchmarks only. CUDA bf16 tensors never reach this
dispatch: `quant.core.quantize` sends them to the Triton kernels (`triton_kernels.py`) first;
other CUDA tensors take the torch twin.
"""

from __future__ import annotations

import torch

from qerl_rollout.quant.kernels import cpu, reference


def _check_finite(w: torch.Tensor) -> None:
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or Inf")


def absmax(w_3d: torch.Tensor) -> torch.Tensor:
    if cpu.supports(w_3d):
        return cpu.absmax(w_3d)
    _check_finite(w_3d)
    return reference.absmax(w_3d)


def fp8(w_3d: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    if cpu.supports(w_3d):
        return cpu.fp8(w_3d, block, reference.fp8_scale_eps(w_3d.dtype))
    _check_finite(w_3d)
    return reference.fp8(w_3d, block)


def int8(w_3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cpu.supports(w_3d):
        return cpu.int8(w_3d, reference.fp8_scale_eps(w_3d.dtype))
    _check_finite(w_3d)
    return reference.int8(w_3d)


def nvfp4(w_3d: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cpu.supports(w_3d):
        return cpu.nvfp4(w_3d, global_scale)
    _check_finite(w_3d)
    return reference.nvfp4(w_3d, global_scale)


def fp8_dequantize(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    if w_fp8.device.type == "cpu" and scale.dtype in (torch.bfloat16, torch.float16) and cpu.available():
        return cpu.fp8_dequantize(w_fp8, scale, block)
    return reference.fp8_dequantize(w_fp8, scale, block)


def int8_dequantize(w_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if w_int8.device.type == "cpu" and scale.dtype in (torch.bfloat16, torch.float16) and cpu.available():
        return cpu.int8_dequantize(w_int8, scale)
    return reference.int8_dequantize(w_int8, scale)


def nvfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    if packed.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and cpu.available():
        return cpu.nvfp4_dequantize(packed, scale, global_scale, dtype)
    return reference.nvfp4_dequantize(packed, scale, global_scale, dtype)
