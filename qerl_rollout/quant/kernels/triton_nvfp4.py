"""Triton kernels for NVFP4 weights: E2M1 values, E4M3 scale per 16 values, fp32 global scale.

NVFP4 needs the tensor's amax before any group can be scaled, so it takes two passes:

1. `nvfp4_amax_kernel` (skipped when the caller passes `global_amax`): one program per
   BLOCK_N x BLOCK_K tile of one expert writes the tile's amax to a small partial buffer;
   torch reduces it per expert (an exact max, no rounding).
2. `nvfp4_quantize_kernel`: one program per BLOCK_N x BLOCK_K tile of one expert. It
   recomputes the expert's global scale from the amax, then for each group of 16
   consecutive columns (compressed-tensors' dtype flow, bf16 weight):

       global_scale  = fp32(bf16(bf16(1 / amax) * 2688))   (= 448*6/amax as torch
                       evaluates `2688.0 / t` for a bf16 t: reciprocal, then multiply;
                       inf -> 1.0, amax clamped to the smallest normal)
       scale_fp32    = global_scale * fp32(bf16(group_amax / 6))
       scale_e4m3    = e4m3(min(scale_fp32, 448)), 0 -> 0.125
       x             = w / (scale_e4m3 / global_scale)            (fp32, IEEE division)
       code          = e2m1(clamp(x, -6, 6)), two per byte, even column in the low nibble

With HAS_LORA both passes quantize bf16(W + scaling * (B @ A)), formed tile by tile in
registers (see `load_merged_tile`); W and the LoRA factors are read once per pass.

Left out: K not a multiple of 16 (compressed-tensors rejects it too), weight dtypes other
than bf16, NaN/Inf weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qerl_rollout.quant.kernels.triton_numerics import (
    div_f32,
    e2m1_code_rtne,
    e4m3_code_rtne,
    e4m3_value,
    load_merged_tile,
    round_f32_to_bf16,
)

GROUP = 16


@triton.jit
def nvfp4_amax_kernel(w_ptr, a_ptr, b_ptr, partial_ptr, N, K,
                      stride_we, stride_wn, stride_wk,
                      stride_ae, stride_ar, stride_ak,
                      stride_be, stride_bn, stride_br,
                      scaling, rank,
                      HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    expert = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w, _ = load_merged_tile(
        w_ptr + expert * stride_we, a_ptr + expert * stride_ae, b_ptr + expert * stride_be,
        rows, cols, N, K, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        scaling, rank, HAS_LORA)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    tiles = tl.num_programs(0) * tl.num_programs(1)
    tl.store(partial_ptr + expert * tiles + pid_n * tl.num_programs(1) + pid_k, amax)


@triton.jit
def nvfp4_global_scale(amax):
    """fp32 global scale from a (bf16-valued) amax, as compressed-tensors' generate_gparam."""
    amax = tl.maximum(amax, 1.1754943508222875e-38)  # finfo(bf16).tiny == 2**-126
    reciprocal = round_f32_to_bf16(div_f32(1.0, amax))
    global_scale = round_f32_to_bf16(reciprocal * 2688.0)
    return tl.where(global_scale > 3.4e38, 1.0, global_scale)  # only inf exceeds bf16 max


@triton.jit
def nvfp4_group_scale(group_amax, global_scale):
    """(e4m3 byte, its fp32 value) of the group scale global_scale * bf16(amax / 6)."""
    scale = global_scale * round_f32_to_bf16(div_f32(group_amax, 6.0))
    code = e4m3_code_rtne(tl.minimum(scale, 448.0))
    code = tl.where(code == 0, 0x20, code)  # a zero scale becomes 0.125 (0x20)
    return code, e4m3_value(code)


@triton.jit
def nvfp4_pack(codes, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Two 4-bit codes per byte along K, the even column in the low nibble."""
    low, high = tl.split(tl.reshape(codes, (BLOCK_N, BLOCK_K // 2, 2)))
    return (low | (high << 4)).to(tl.uint8)


@triton.jit
def nvfp4_quantize_kernel(w_ptr, a_ptr, b_ptr, amax_ptr, packed_ptr, scale_ptr,
                          global_scale_ptr, N, K,
                          stride_we, stride_wn, stride_wk,
                          stride_ae, stride_ar, stride_ak,
                          stride_be, stride_bn, stride_br,
                          scaling, rank,
                          HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    expert = tl.program_id(2).to(tl.int64)
    global_scale = nvfp4_global_scale(tl.load(amax_ptr + expert))
    if (pid_n == 0) & (pid_k == 0):
        tl.store(global_scale_ptr + expert, global_scale)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w, _ = load_merged_tile(
        w_ptr + expert * stride_we, a_ptr + expert * stride_ae, b_ptr + expert * stride_be,
        rows, cols, N, K, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        scaling, rank, HAS_LORA)
    groups = tl.reshape(w, (BLOCK_N, BLOCK_K // 16, 16))
    scale_code, scale = nvfp4_group_scale(tl.max(tl.abs(groups), axis=2), global_scale)
    x = div_f32(groups, div_f32(scale, global_scale)[:, :, None])
    x = tl.minimum(tl.maximum(x, -6.0), 6.0)
    codes = tl.reshape(e2m1_code_rtne(x), (BLOCK_N, BLOCK_K))

    group_cols = pid_k * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    scale_ptrs = scale_ptr + expert * N * (K // 16) + rows[:, None] * (K // 16) + group_cols[None, :]
    scale_mask = (rows[:, None] < N) & (group_cols[None, :] < K // 16)
    tl.store(scale_ptrs, scale_code.to(tl.uint8), mask=scale_mask)

    byte_cols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    packed_ptrs = packed_ptr + expert * N * (K // 2) + rows[:, None] * (K // 2) + byte_cols[None, :]
    packed_mask = (rows[:, None] < N) & (byte_cols[None, :] < K // 2)
    tl.store(packed_ptrs, nvfp4_pack(codes, BLOCK_N, BLOCK_K), mask=packed_mask)
