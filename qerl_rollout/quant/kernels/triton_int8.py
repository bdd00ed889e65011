"""Triton kernel for INT8 weights with one scale per output row (compressed-tensors W8A8).

It reproduces compressed-tensors' dtype flow for a bf16 weight bit for bit:

    scale_bf16 = bf16(amax_row / 127.5)      (zero -> zero_scale: finfo(bf16).eps)
    w_int8     = rint(clamp(bf16(w / scale_bf16), -128, 127))   round half to even

`int8_channel_kernel`: one program per BLOCK_N rows of one expert (grid: row blocks, experts),
two passes over the row like `fp8_channel_kernel` (amax chunk by chunk, then quantize), with
HAS_LORA forming bf16(W + scaling * B @ A) in registers (`load_merged_tile`). The integer
rounding is `rint_f32`: adding and subtracting 1.5 * 2**23 rounds an fp32 of magnitude below
2**22 to the nearest integer, ties to even, with two IEEE adds (no libdevice call, so the
interpreter and every GPU compute the same value; launched with enable_fp_fusion=False).
Left out: weight dtypes other than bf16, NaN/Inf weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qerl_rollout.quant.kernels.triton_numerics import div_f32, load_merged_tile, round_f32_to_bf16

_RINT_MAGIC = 12582912.0  # 1.5 * 2**23


@triton.jit
def rint_f32(x):
    """Nearest integer of fp32 `x` (|x| < 2**22), ties to even, as fp32."""
    return (x + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def int8_channel_kernel(w_ptr, a_ptr, b_ptr, q_ptr, scale_ptr, N, K,
                        stride_we, stride_wn, stride_wk,
                        stride_ae, stride_ar, stride_ak,
                        stride_be, stride_bn, stride_br,
                        scaling, rank, zero_scale,
                        HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    expert = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base = w_ptr + expert * stride_we
    a_base = a_ptr + expert * stride_ae
    b_base = b_ptr + expert * stride_be

    amax = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w, mask = load_merged_tile(
            w_base, a_base, b_base, rows, cols, N, K, stride_wn, stride_wk,
            stride_ar, stride_ak, stride_bn, stride_br, scaling, rank, HAS_LORA)
        amax = tl.maximum(amax, tl.max(tl.abs(w), axis=1))
    scale = round_f32_to_bf16(div_f32(amax, 127.5))
    scale = tl.where(scale == 0.0, zero_scale, scale)
    tl.store(scale_ptr + expert * N + rows, scale.to(tl.bfloat16), mask=rows < N)

    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w, mask = load_merged_tile(
            w_base, a_base, b_base, rows, cols, N, K, stride_wn, stride_wk,
            stride_ar, stride_ak, stride_bn, stride_br, scaling, rank, HAS_LORA)
        q = round_f32_to_bf16(div_f32(w, scale[:, None]))
        q = rint_f32(tl.minimum(tl.maximum(q, -128.0), 127.0))
        q_ptrs = q_ptr + expert * N * K + rows[:, None] * K + cols[None, :]
        tl.store(q_ptrs, q.to(tl.int8), mask=mask)
