"""Bit-exact rounding helpers for the Triton quantization kernels.

Every rounding step the compressed-tensors reference performs is redone here with integer
operations on the fp32 bit pattern, so the kernels produce the same bytes on a GPU and in
Triton's CPU interpreter:

- `round_f32_to_bf16`: fp32 -> nearest bf16 value (round half to even), returned as fp32.
  This is what torch does after every bf16 op (compute in fp32, round the result).
- `e4m3_code_rtne`: fp32 (|x| <= 448) -> float8_e4m3fn byte, round half to even,
  subnormals included, sign kept on zero (-0.0 -> 0x80), like `tensor.to(float8_e4m3fn)`.
- `e4m3_value`: the fp32 value of an e4m3fn byte (no NaN byte is ever produced here).
- `e2m1_code_rtne`: fp32 -> 4-bit E2M1 code with compressed-tensors' thresholds
  (`FP4_E2M1_DATA.cast_to_fp4` + `pack_fp4_to_uint8`): ties go to the even code
  (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4), the sign bit is set for
  strictly negative inputs (so -0.1 -> 0x8 but -0.0 -> 0x0).
- `div_f32`: IEEE round-to-nearest fp32 division (`div_rn`); Triton's plain `/` lowers to
  an approximate division on NVIDIA GPUs, which would break bit-exactness.

Why not `x.to(tl.float8e4nv)`: Triton 3.9's interpreter does not emulate the float8 cast
faithfully (126.5 -> 64 was observed), and on GPUs the cast's rounding depends on the
architecture's cvt instruction. The integer version is exact everywhere and costs a few
integer ops on a memory-bound kernel.

Left out: NaN and Inf inputs (a NaN weight gives an unspecified byte; the torch path is the
one to use for diagnosing those), and any weight dtype other than bf16.
"""

from __future__ import annotations

import triton
import triton.language as tl

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E4M3_MIN_NORMAL = 0.015625  # 2**-6


@triton.jit
def div_f32(x, y):
    """x / y in fp32, correctly rounded (IEEE), broadcasting like `/`."""
    return tl.math.div_rn(x, y)


@triton.jit
def round_f32_to_bf16(x):
    """Nearest bf16 value of fp32 `x` (round half to even; overflow -> inf), as fp32."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_code_rtne(x):
    """float8_e4m3fn byte (int32 in 0..255) of fp32 `x`, |x| <= 448, round half to even."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag_bits = bits & 0x7FFFFFFF
    mag = mag_bits.to(tl.float32, bitcast=True)
    # normal range: round the 23-bit mantissa to 3 bits, then rebias the exponent 127 -> 7
    rounded = mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)
    normal_code = (rounded >> 20) - ((127 - 7) << 3)
    # subnormal range (|x| < 2**-6): code = rint(|x| * 2**9); adding 2**23 rounds to integer
    sub_magic = mag * 512.0 + 8388608.0
    sub_code = sub_magic.to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(mag < 0.015625, sub_code, normal_code)
    return code | sign


@triton.jit
def e4m3_value(code):
    """fp32 value of a non-negative e4m3fn byte given as int32 (sign bit must be 0)."""
    exp = (code >> 3) & 15
    mant = code & 7
    normal = (((exp + (127 - 7)) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    subnormal = mant.to(tl.float32) * 0.001953125  # 2**-9, exact
    return tl.where(exp == 0, subnormal, normal)


@triton.jit
def e2m1_code_rtne(x):
    """4-bit E2M1 code (int32 in 0..15) of fp32 `x`, compressed-tensors' rounding."""
    mag = tl.abs(x)
    code = (mag > 0.25).to(tl.int32)
    code += (mag >= 0.75).to(tl.int32)
    code += (mag > 1.25).to(tl.int32)
    code += (mag >= 1.75).to(tl.int32)
    code += (mag > 2.5).to(tl.int32)
    code += (mag >= 3.5).to(tl.int32)
    code += (mag > 5.0).to(tl.int32)
    return code | tl.where(x < 0, 8, 0)


@triton.jit
def load_merged_tile(w_ptr, a_ptr, b_ptr, rows, cols, N, K,
                     stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                     scaling, rank, HAS_LORA: tl.constexpr):
    """One (rows x cols) tile of W, or of bf16(W + scaling * (B @ A)), as fp32.

    Pointers are already offset to the current expert. Out-of-range elements read as 0,
    which is what compressed-tensors' zero padding gives. The LoRA product is summed
    rank by rank in order r = 0..rank-1 in fp32 (separate multiply and add, no FMA when
    launched with enable_fp_fusion=False), then scaled, added to W in fp32 and rounded
    to bf16: exactly `merge_lora_reference` in triton_kernels.py.
    """
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        delta = tl.zeros(w.shape, dtype=tl.float32)
        for r in range(rank):
            b = tl.load(b_ptr + rows * stride_bn + r * stride_br, mask=rows < N, other=0.0)
            a = tl.load(a_ptr + r * stride_ar + cols * stride_ak, mask=cols < K, other=0.0)
            delta = delta + b.to(tl.float32)[:, None] * a.to(tl.float32)[None, :]
        w = round_f32_to_bf16(w + scaling * delta)
    return w, mask
