"""Triton kernels for FP8 (float8_e4m3fn) weights: 128x128 block scales and per-row scales.

Both reproduce compressed-tensors' dtype flow for a bf16 weight bit for bit:

    scale_bf16 = bf16(amax / 448)          (amax of the block / row, exact in bf16)
    scale_bf16 = zero_scale where it is 0  (compressed-tensors: finfo(bf16).eps)
    w_fp8      = e4m3(clamp(bf16(w / scale_bf16) + 0, -448, 448))   round half to even

(`+ 0` is the zero zero-point compressed-tensors' compressor adds: it turns -0.0 into +0.0,
so a -0.0 weight gives byte 0x00, while a tiny negative one still gives 0x80.)

`fp8_block_kernel`: one program per 128x128 block of one expert (grid: row blocks,
column blocks, experts). The whole block is held in registers, so W is read once.
Partial blocks at the right and bottom edges are masked; the masked elements read as
zero, exactly like compressed-tensors' zero padding, and are never stored.

`fp8_channel_kernel`: one program per BLOCK_N rows of one expert (grid: row blocks,
experts). Two passes over the row: the first reduces the row amax chunk by chunk
(BLOCK_K columns at a time), the second re-reads the row (mostly from L2) and quantizes.

With HAS_LORA the kernels quantize bf16(W + scaling * (B @ A)) instead of W; the merged
tile is formed in registers (see `load_merged_tile`) and never written to memory. The
per-row kernel forms it twice, once per pass.

Left out: weight dtypes other than bf16, NaN/Inf weights, block shapes other than 128x128.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qerl_rollout.quant.kernels.triton_numerics import (
    div_f32,
    e4m3_code_rtne,
    load_merged_tile,
    round_f32_to_bf16,
)


@triton.jit
def fp8_scale_from_amax(amax, zero_scale):
    """bf16(amax / 448) as fp32, with `zero_scale` in place of a zero scale."""
    scale = round_f32_to_bf16(div_f32(amax, 448.0))
    return tl.where(scale == 0.0, zero_scale, scale)


@triton.jit
def fp8_codes(w, scale):
    """e4m3 bytes (int32) of bf16(w / scale) + 0, clamped to +-448."""
    q = round_f32_to_bf16(div_f32(w, scale)) + 0.0  # the zero zero-point: -0 -> +0
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    return e4m3_code_rtne(q)


@triton.jit
def fp8_block_kernel(w_ptr, a_ptr, b_ptr, q_ptr, scale_ptr, N, K,
                     stride_we, stride_wn, stride_wk,
                     stride_ae, stride_ar, stride_ak,
                     stride_be, stride_bn, stride_br,
                     scaling, rank, zero_scale,
                     HAS_LORA: tl.constexpr, BLOCK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    expert = tl.program_id(2).to(tl.int64)
    n_blocks = (N + BLOCK - 1) // BLOCK
    k_blocks = (K + BLOCK - 1) // BLOCK
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    w, mask = load_merged_tile(
        w_ptr + expert * stride_we, a_ptr + expert * stride_ae, b_ptr + expert * stride_be,
        rows, cols, N, K, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        scaling, rank, HAS_LORA)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    scale = fp8_scale_from_amax(amax, zero_scale)
    codes = fp8_codes(w, scale)
    q_ptrs = q_ptr + expert * N * K + rows[:, None] * K + cols[None, :]
    tl.store(q_ptrs, codes.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + expert * n_blocks * k_blocks + pid_n * k_blocks + pid_k,
             scale.to(tl.bfloat16))


@triton.jit
def fp8_channel_kernel(w_ptr, a_ptr, b_ptr, q_ptr, scale_ptr, N, K,
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
    scale = fp8_scale_from_amax(amax, zero_scale)
    tl.store(scale_ptr + expert * N + rows, scale.to(tl.bfloat16), mask=rows < N)

    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w, mask = load_merged_tile(
            w_base, a_base, b_base, rows, cols, N, K, stride_wn, stride_wk,
            stride_ar, stride_ak, stride_bn, stride_br, scaling, rank, HAS_LORA)
        codes = fp8_codes(w, scale[:, None])
        q_ptrs = q_ptr + expert * N * K + rows[:, None] * K + cols[None, :]
        tl.store(q_ptrs, codes.to(tl.uint8), mask=mask)
