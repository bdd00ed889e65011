"""Bit-exactness against compressed-tensors 0.17 and hand-written E2M1/E4M3 encoding tables.

The golden tables are written by hand from the formats' definitions (E2M1: 0, .5, 1, 1.5, 2,
3, 4, 6; E4M3: bias 7, 3 mantissa bits, subnormal step 2^-9, max 448), with ties resolved to
the even code. Everything else compares against compressed-tensors' own functions
(kernels/ct_oracle.py) with torch.equal on the raw bytes: no tolerance.
"""

from __future__ import annotations

import pytest
import torch

from qerl_rollout.quant import quantize
from qerl_rollout.quant.kernels import cpu, reference
from qerl_rollout.quant.kernels.ct_oracle import ct_compress, ct_dequantize

# (value divided by its scale, expected 4-bit code): code = sign << 3 | index into E2M1 values.
# Values next to a tie are one bf16 ulp away from it, so they survive the cast to bf16/fp16.
E2M1_GOLDEN = [
    (0.0, 0x0), (-0.0, 0x0),  # the zero zero-point turns -0 into +0
    (0.25, 0x0), (0.251953125, 0x1), (0.5, 0x1), (0.74609375, 0x1), (0.75, 0x2),  # ties: .25 -> 0, .75 -> 1
    (1.0, 0x2), (1.25, 0x2), (1.2578125, 0x3), (1.5, 0x3), (1.75, 0x4),  # 1.25 -> 1.0, 1.75 -> 2.0
    (2.0, 0x4), (2.5, 0x4), (2.515625, 0x5), (3.0, 0x5), (3.5, 0x6),  # 2.5 -> 2.0, 3.5 -> 4.0
    (4.0, 0x6), (5.0, 0x6), (5.03125, 0x7), (6.0, 0x7), (7.5, 0x7),  # 5 -> 4, clamp above 6
    (-0.1, 0x8), (-0.5, 0x9), (-0.75, 0xA), (-1.5, 0xB), (-2.5, 0xC), (-3.0, 0xD),
    (-3.5, 0xE), (-6.0, 0xF), (-100.0, 0xF),
]

# (value with scale 1.0, expected e4m3fn byte)
E4M3_GOLDEN = [
    (0.0, 0x00), (-0.0, 0x00), (1.0, 0x38), (-1.0, 0xB8), (448.0, 0x7E), (-448.0, 0xFE),
    (240.0, 0x77), (0.015625, 0x08),  # 2^-6: smallest normal
    (2.0**-9, 0x01), (2.0**-10, 0x00), (3 * 2.0**-10, 0x02),  # subnormal ties to even
    (7 * 2.0**-9, 0x07), (15 * 2.0**-10, 0x08),  # 7.5 * 2^-9 ties up into the normals
    (1.0625, 0x38), (1.1875, 0x3A), (1.125, 0x39),  # mantissa ties to even
    (-1e-5, 0x80),  # a tiny negative keeps its sign
    (416.0, 0x7D), (432.0, 0x7E),  # 432 ties between 416 and 448 -> even (448)
]


def _e2m1_weight(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    """One group per value: [v, 0, ..., 0, 6]; with global scale 1 every group scale is 1."""
    w = torch.zeros(len(values), 16, dtype=dtype)
    w[:, 0] = torch.tensor(values, dtype=torch.float32).to(dtype)
    w[:, 15] = 6.0
    return w.reshape(1, 1, -1)


def test_e2m1_codes_golden():
    values = torch.tensor([v for v, _ in E2M1_GOLDEN])
    assert reference.e2m1_codes(values + 0.0).tolist() == [code for _, code in E2M1_GOLDEN]


IN_RANGE = [(v, code) for v, code in E2M1_GOLDEN if abs(v) <= 6.0]


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_e2m1_golden_through_kernels(impl, dtype):
    w = _e2m1_weight([v for v, _ in IN_RANGE], dtype)
    kernel = reference.nvfp4 if impl == "reference" else cpu.nvfp4
    packed, scale = kernel(w, torch.tensor([1.0]))
    assert torch.equal(scale.view(torch.uint8), torch.full_like(scale.view(torch.uint8), 0x38))
    codes = (packed[0, 0, ::8] & 0xF).tolist()  # low nibble of each group's first byte
    for (v, want), got in zip(IN_RANGE, codes):
        assert got == want, f"{v} ({dtype}: {float(torch.tensor(v).to(dtype))}) -> {got:#x}, expected {want:#x}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_e2m1_golden_matches_compressed_tensors(dtype):
    w = _e2m1_weight([v for v, _ in IN_RANGE], dtype)[0]
    ours = quantize(w, "nvfp4", global_amax=torch.tensor(6.0)).compressed()
    ref = ct_compress(w, "nvfp4", global_amax=torch.tensor(6.0))
    assert torch.equal(ours["weight_packed"], ref["weight_packed"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_e4m3_golden(dtype):
    values = [v for v, _ in E4M3_GOLDEN]
    w = torch.tensor(values, dtype=torch.float32).to(dtype)
    assert w.float().tolist() == [float(torch.tensor(v).to(dtype)) for v in values]
    w = w.reshape(1, -1)
    assert float(w.abs().max()) == 448.0  # so the channel scale is exactly 448/448 = 1
    q = quantize(w, "fp8_channel").compressed()
    assert q["weight_scale"].float().item() == 1.0
    got = q["weight"].view(torch.uint8)[0].tolist()
    for (v, want), b in zip(E4M3_GOLDEN, got):
        assert b == want, f"{v} ({dtype}) -> {b:#04x}, expected {want:#04x}"
    assert torch.equal(q["weight"].view(torch.uint8), ct_compress(w, "fp8_channel")["weight"].view(torch.uint8))


def _weights(dtype: torch.dtype, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand((shape[0], 1), generator=g) * 0.1
    flat = w.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
    flat[idx] *= 300.0  # outliers
    w = w.to(dtype)
    w[: min(shape[0], 130), : min(shape[1], 32)] = 0.0  # an all-zero block/group region
    w[0, ::3] = -0.0
    return w


SHAPES = [(128, 128), (256, 512), (200, 300), (130, 48), (1, 16), (17, 32), (384, 272), (7, 1)]
CASES = [(s, shape) for s in ("fp8_block", "fp8_channel", "int8", "nvfp4") for shape in SHAPES
         if s != "nvfp4" or shape[1] % 16 == 0]


def _assert_same(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for key, b in ref.items():
        a = ours[key]
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), key
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scheme,shape", CASES)
def test_matches_compressed_tensors(scheme, shape, dtype):
    w = _weights(dtype, shape, seed=shape[0] * 1000 + shape[1])
    qw = quantize(w, scheme)
    ref = ct_compress(w, scheme)
    _assert_same(qw.compressed(), ref)
    deq = qw.dequantize()
    assert deq.dtype == dtype and torch.equal(deq, ct_dequantize(ref, scheme, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nvfp4_global_amax_matches_compressed_tensors(dtype):
    w = _weights(dtype, (64, 128), seed=3)
    for amax in (torch.tensor(50.0), torch.tensor(0.001), w.abs().max().float() * 2):
        _assert_same(quantize(w, "nvfp4", global_amax=amax).compressed(), ct_compress(w, "nvfp4", amax))


@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_channel", "int8", "nvfp4"])
def test_stacked_experts_match_compressed_tensors(scheme):
    w = torch.stack([_weights(torch.bfloat16, (136, 256), seed=e) * (10.0**e) for e in range(-2, 2)])
    ours = quantize(w, scheme).compressed()
    for e in range(w.shape[0]):
        _assert_same({k: v[e] for k, v in ours.items()}, ct_compress(w[e], scheme))


def test_random_bit_patterns_match_compressed_tensors():
    """Every finite bf16 magnitude class, not just gaussians: random 16-bit patterns."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**15), 2**15, (256, 256), generator=g, dtype=torch.int32).to(torch.int16)
    w = bits.view(torch.bfloat16)
    w = torch.where(torch.isfinite(w), w, torch.zeros((), dtype=torch.bfloat16))
    for scheme in ("fp8_block", "fp8_channel", "int8", "nvfp4"):
        _assert_same(quantize(w, scheme).compressed(), ct_compress(w, scheme))


@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_channel", "int8", "nvfp4"])
def test_corrupted_reference_fails(scheme):
    """The comparison can fail: flip one byte of our output and it must no longer match."""
    w = _weights(torch.bfloat16, (128, 128), seed=1)
    ours = quantize(w, scheme).compressed()
    key = "weight_packed" if scheme == "nvfp4" else "weight"
    ours[key] = ours[key].clone()
    ours[key].view(torch.uint8)[5, 5] ^= 0x01
    with pytest.raises(AssertionError):
        _assert_same(ours, ct_compress(w, scheme))


# int8 golden rows, derived by hand. Row 0: amax 127.5 gives scale = 127.5 / 127.5 = 1.0, so
# w / scale = w and the integer rounding alone decides: ties go to the even integer (0.5 -> 0,
# 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2), 127.5 -> 128 clamps to 127, and -127.5 rounds to
# -128 (the only way to reach -128). Row 1: an all-zero row gets compressed-tensors' eps scale
# (finfo(dtype).eps) and zero codes. Row 2, in bf16: 2.55 is stored as 2.546875, scale =
# bf16(2.546875 / 127.5 = 0.019976) = 0.02001953125 (41/2048); 2.546875 / scale = 127.22 ->
# 127; 1.0 / scale = 49.95 -> bf16 50.0 -> 50; 0.01 is stored as 41/4096, exactly half the
# scale: a tie, -> 0; 0.5 / scale = 24.98 -> bf16 25.0 -> 25. In fp16 the same row differs:
# 2.55 -> 2.55078, scale 0.0200043, 2.55078 / scale = 127.51 -> fp16 127.5, a tie: +127.5 ->
# 128 -> clamped 127 but -127.5 -> -128 (the division's rounding to the weight dtype matters).
INT8_GOLDEN = [
    ([127.5, 0.5, 1.5, 2.5, -0.5, -1.5, -127.5, 0.0], {"all": [127, 0, 2, 2, 0, -2, -128, 0]}),
    ([0.0] * 8, {"all": [0] * 8}),
    ([2.55, -2.55, 1.0, 0.01, 0.0, -0.0, 0.5, -1.0],
     {torch.bfloat16: [127, -127, 50, 0, 0, 0, 25, -50], torch.float16: [127, -128, 50, 0, 0, 0, 25, -50]}),
]
INT8_GOLDEN_SCALES = {torch.bfloat16: [1.0, 2.0**-7, 41 / 2048], torch.float16: [1.0, 2.0**-10, None]}


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_golden(impl, dtype):
    from qerl_rollout.quant.kernels import cpu, reference

    w = torch.tensor([row for row, _ in INT8_GOLDEN], dtype=dtype)[None]
    q, scale = cpu.int8(w, torch.finfo(dtype).eps) if impl == "cpu" else reference.int8(w)
    for i, (_, codes) in enumerate(INT8_GOLDEN):
        assert q[0, i].tolist() == codes.get("all", codes.get(dtype)), i
        expected_scale = INT8_GOLDEN_SCALES[dtype][i]
        if expected_scale is not None:
            assert scale[0, i, 0].item() == expected_scale, i
    _assert_same({"weight": q[0], "weight_scale": scale[0]}, ct_compress(w[0], "int8"))
