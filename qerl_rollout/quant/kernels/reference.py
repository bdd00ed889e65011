"""Plain torch twin of the quantization kernels: the obvious code, one expert at a time.

How it works: every function takes a stacked (E, N, K) weight in bf16 or fp16 and follows
compressed-tensors 0.17's dtype flow step by step (observer min/max -> `calculate_qparams`
-> compressor `quantize` with a zero zero-point -> pack), so each line can be checked against
that library:

- fp8 scale = amax / 448 in the weight dtype; a zero scale becomes `finfo(w dtype).eps`
  (compressed-tensors' eps for a scale stored in the weight dtype; 0.0078125 for bf16).
  w_fp8 = e4m3(clamp(w / scale in the weight dtype + 0, -448, 448)). Partial 128-blocks
  at the right/bottom edge are padded with zeros, which never change an amax.
- nvfp4 global scale = 2688 / max(amax, tiny) evaluated the way torch evaluates `2688.0 / t`,
  i.e. `t.reciprocal() * 2688.0` with two roundings in the weight dtype, Inf -> 1.0, then fp32.
  group scale = e4m3(clamp(global_scale * (group_amax / 6 in the weight dtype), +-448)) with
  0 -> 0.125; codes = E2M1(w / (scale / global_scale) + 0) with ties to the even code.

This is the twin that `kernels/cpu.py` is held equal to, bit for bit, and the fallback when the
C++ build is unavailable. What it leaves out: speed and memory thrift (it materialises fp32
temporaries of one expert).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
INT8_HALF_RANGE = 127.5  # compressed-tensors: (q_max - q_min) / 2 = (127 - -128) / 2
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_SCALE_EPS = 0.125  # compressed-tensors' eps for an e4m3 scale


def fp8_scale_eps(dtype: torch.dtype) -> float:
    """The value compressed-tensors puts in place of a zero fp8 scale held in `dtype`."""
    return torch.finfo(dtype).eps


def absmax(w_3d: torch.Tensor) -> torch.Tensor:
    """Per-expert max |w|, (E,) in w's dtype."""
    return w_3d.abs().amax(dim=(1, 2))


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' `generate_gparam` for symmetric min/max = (-amax, amax); fp32."""
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    global_scale = amax.reciprocal() * (FP8_MAX * E2M1_MAX)  # what `2688.0 / amax` computes
    global_scale = torch.nan_to_num(global_scale, nan=1.0, posinf=1.0, neginf=1.0)
    return global_scale.to(torch.float32)


def _pad_to(w_2d: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    N, K = w_2d.shape
    return torch.nn.functional.pad(w_2d, (0, -K % bw, 0, -N % bh))


def fp8_one(w_2d: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (N, K) weight -> (w_fp8 (N, K), scale (ceil(N/bh), ceil(K/bw)) in w's dtype)."""
    N, K = w_2d.shape
    bh, bw = block
    w_pad = _pad_to(w_2d, bh, bw)
    tiles = w_pad.unflatten(0, (-1, bh)).unflatten(-1, (-1, bw))  # (nrb, bh, ncb, bw)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = amax / FP8_MAX
    scale = torch.where(scale == 0, fp8_scale_eps(w_2d.dtype), scale)
    scaled = tiles / scale[:, None, :, None] + 0.0  # + the zero zero-point: -0 -> +0
    w_fp8 = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w_fp8.reshape(w_pad.shape)[:N, :K].contiguous(), scale


def fp8(w_3d: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [fp8_one(w_2d, block) for w_2d in w_3d]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def fp8_dequantize(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(E, N, K) fp8 and (E, nrb, ncb) scales -> (E, N, K) in the scale's dtype."""
    E, N, K = w_fp8.shape
    bh, bw = block
    if N % bh == 0 and K % bw == 0:   # whole blocks: broadcast the scales, no expanded copy
        w = w_fp8.to(scale.dtype).view(E, N // bh, bh, K // bw, bw)
        return (w * scale[:, :, None, :, None]).view(E, N, K)
    scale_full = scale.repeat_interleave(bh, dim=1).repeat_interleave(bw, dim=2)[:, :N, :K]
    return w_fp8.to(scale.dtype) * scale_full


def int8(w_3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, K) -> (w_int8 (E, N, K), scale (E, N, 1) in w's dtype), per-row symmetric."""
    amax = w_3d.abs().amax(dim=-1, keepdim=True)
    scale = amax / INT8_HALF_RANGE
    scale = torch.where(scale == 0, fp8_scale_eps(w_3d.dtype), scale)
    scaled = w_3d / scale + 0.0   # rounded to w's dtype, then + the zero zero-point
    return scaled.clamp(-128, 127).round().to(torch.int8), scale


def int8_dequantize(w_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(E, N, K) int8 and (E, N, 1) scales -> (E, N, K) in the scale's dtype (one rounding)."""
    return w_int8.to(scale.dtype) * scale


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Values already divided by their scale -> 4-bit E2M1 codes (int64), ties to even code."""
    v = v.clamp(-E2M1_MAX, E2M1_MAX)
    a = v.abs()
    idx = (
        (a > 0.25).long() + (a >= 0.75).long() + (a > 1.25).long() + (a >= 1.75).long()
        + (a > 2.5).long() + (a >= 3.5).long() + (a > 5.0).long()
    )
    return idx | ((v < 0).long() << 3)


def nvfp4_one(w_2d: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One (N, K) weight, fp32 scalar global scale -> (packed (N, K/2) uint8, scale (N, K/16) e4m3)."""
    groups = w_2d.unflatten(-1, (-1, 16))  # (N, G, 16)
    scale_w = groups.abs().amax(dim=-1) / E2M1_MAX  # in w's dtype
    scale = (global_scale * scale_w.to(torch.float32)).clamp(-FP8_MAX, FP8_MAX)
    scale = scale.to(torch.float8_e4m3fn).to(torch.float32)
    scale = torch.where(scale == 0, NVFP4_SCALE_EPS, scale)
    scale_eff = scale / global_scale
    codes = e2m1_codes(groups / scale_eff[..., None] + 0.0).flatten(-2)  # + zero point
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.to(torch.uint8), scale.to(torch.float8_e4m3fn)


def nvfp4(w_3d: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [nvfp4_one(w_2d, gs) for w_2d, gs in zip(w_3d, global_scale.to(torch.float32))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _e2m1_pair_table() -> torch.Tensor:
    """(256, 2) fp32: the (low nibble, high nibble) values of every packed byte."""
    mag = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    code = torch.arange(16)
    nibble = torch.where(code >= 8, -mag[code % 8], mag[code % 8])
    byte = torch.arange(256)
    return torch.stack([nibble[byte & 0xF], nibble[byte >> 4]], dim=-1)


def nvfp4_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(E, N, K/2) packed, (E, N, K/16) e4m3, (E,) fp32 -> (E, N, K) in dtype."""
    table = _e2m1_pair_table()
    out = []
    for packed_e, scale_e, gs in zip(packed, scale, global_scale.to(torch.float32)):
        values = table[packed_e.long()].flatten(-2).unflatten(-1, (-1, 16))  # (N, G, 16)
        scale_eff = scale_e.to(torch.float32) / gs
        out.append((values * scale_eff[..., None]).flatten(-2).to(dtype))
    return torch.stack(out)
