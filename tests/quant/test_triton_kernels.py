"""Triton requantization kernels, run by Triton's CPU interpreter, held bit-exact to the
torch references (compressed-tensors' own functions via `kernels/ct_oracle.py`, and the
quantization core's `quantize(...).compressed()` once it imports).

TRITON_INTERPRET=1 is set before triton is imported. If something earlier in the session
imported triton without it (torch.compile does), triton's own @jit library functions (tl.max,
tl.zeros, ...) cannot run interpreted any more: the whole module then reruns in a fresh
pytest subprocess and the in-process tests skip. Kernel modules imported earlier without the
interpreter are reloaded. Shapes are small: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import triton  # installed by the setup (extra `triton`): a missing install must fail, not skip
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

IN_PROCESS = isinstance(triton.language.standard.max, InterpretedFunction)


@pytest.fixture(autouse=True)
def _interpreter_guard(request):
    if not IN_PROCESS and request.node.originalname != "test_module_in_fresh_interpreter":
        pytest.skip("triton was imported without TRITON_INTERPRET; see the subprocess run")


def test_module_in_fresh_interpreter():
    if IN_PROCESS:
        pytest.skip("triton runs interpreted in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def _interpreted_modules():
    """Import (or re-import) the kernel modules so their @triton.jit runs interpreted."""
    names = ["qerl_rollout.quant.kernels.triton_numerics",
             "qerl_rollout.quant.kernels.triton_fp8",
             "qerl_rollout.quant.kernels.triton_nvfp4"]
    for name in names:
        module = importlib.import_module(name)
        probe = next(v for k, v in vars(module).items()
                     if k.endswith(("_rtne", "_kernel")) and hasattr(v, "fn"))
        if IN_PROCESS and not isinstance(probe, InterpretedFunction):
            importlib.reload(module)
    return [sys.modules[n] for n in names]


numerics, _, _ = _interpreted_modules()
from qerl_rollout.quant.kernels import triton_kernels as tk
from qerl_rollout.quant.kernels.ct_oracle import ct_compress

SCHEMES = ["fp8_block", "fp8_channel", "int8", "nvfp4"]
BF16 = torch.bfloat16


# --- helper kernels that expose the jit rounding helpers elementwise --------------------

@triton.jit
def _apply_kernel(x_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    if OP == 0:
        out = numerics.round_f32_to_bf16(x)
    elif OP == 1:
        out = numerics.e4m3_code_rtne(x)
    elif OP == 2:
        out = numerics.e4m3_value(x)
    else:
        out = numerics.e2m1_code_rtne(x)
    tl.store(out_ptr + offs, out, mask=mask)


def _apply(op: int, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty_like(x, dtype=out_dtype)
    block = 4096
    _apply_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), OP=op, BLOCK=block)
    return out


def _all_bf16_values(limit: float) -> torch.Tensor:
    """Every finite bf16 value with |x| <= limit (both zeros included), as fp32."""
    v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(BF16).float()
    return v[torch.isfinite(v) & (v.abs() <= limit)].contiguous()


def _fp32_ties_and_neighbours(points: list[float]) -> torch.Tensor:
    p = torch.tensor(points, dtype=torch.float32)
    up = torch.nextafter(p, torch.full_like(p, float("inf")))
    down = torch.nextafter(p, torch.full_like(p, -float("inf")))
    v = torch.cat([p, up, down])
    return torch.cat([v, -v]).contiguous()


# --- golden tables --------------------------------------------------------------------

def test_bf16_rounding_matches_torch_on_random_bits_and_ties():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)]
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3.0 + 2**-7, 2**-130 * 1.5], dtype=torch.float32)
    x = torch.cat([x, ties, -ties, torch.tensor([0.0, -0.0, 3.3e38])]).contiguous()
    got = _apply(0, x, torch.float32)
    want = x.to(BF16).float()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_e4m3_encoding_golden_every_bf16_value():
    x = _all_bf16_values(448.0)
    got = _apply(1, x, torch.int32)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    assert torch.equal(got, want)
    # hand-checked ties: 17 -> 16, 19 -> 20, 1.0625 -> 1, 3 * 2**-10 -> 2 * 2**-9, 2**-10 -> 0
    spot = torch.tensor([17.0, 19.0, 1.0625, 3 * 2**-10, 2**-10, -2**-10], dtype=torch.float32)
    assert _apply(1, spot, torch.int32).tolist() == [0x58, 0x5A, 0x38, 0x02, 0x00, 0x80]


def test_e4m3_encoding_fp32_inputs_ties_and_subnormals():
    codes = torch.arange(0, 0x7F, dtype=torch.int32)  # every finite non-negative byte
    values = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    mids = ((values[:-1] + values[1:]) / 2).tolist()  # exact in fp32: the ties
    x = _fp32_ties_and_neighbours(mids + [2**-10, 2**-6, 448.0])
    g = torch.Generator().manual_seed(1)
    rand = torch.exp2(torch.rand(4096, generator=g) * 20 - 12) * 1.337
    x = torch.cat([x, rand.clamp(max=448), -rand.clamp(max=448)]).contiguous()
    got = _apply(1, x, torch.int32)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    assert torch.equal(got, want)


def test_e4m3_decoding_every_finite_byte():
    codes = torch.arange(0, 0x7F, dtype=torch.int32)
    got = _apply(2, codes, torch.float32)
    assert torch.equal(got, codes.to(torch.uint8).view(torch.float8_e4m3fn).float())


def test_e2m1_encoding_golden_ties():
    x = torch.tensor([0.0, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0,
                      -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0, -1e-3, 0.26, 5.01],
                     dtype=torch.float32)
    want = [0, 0, 0, 2, 2, 4, 4, 6, 6, 7,
            8, 10, 10, 12, 12, 14, 14, 15, 8, 1, 7]
    assert _apply(3, x, torch.int32).tolist() == want


def test_e2m1_encoding_matches_reference_around_every_threshold():
    from qerl_rollout.quant.kernels.reference import e2m1_codes

    x = _fp32_ties_and_neighbours([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5,
                                   4.0, 5.0, 6.0, 1e-30])
    x = torch.cat([x, _all_bf16_values(6.0)]).contiguous()
    assert torch.equal(_apply(3, x, torch.int32), e2m1_codes(x).to(torch.int32))


# --- whole kernels against compressed-tensors ---------------------------------------------

def _weight(shape, seed, spice=True) -> torch.Tensor:
    """Random bf16 weight with an all-zero first block, -0.0 entries, tiny negatives, ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 3, shape[:-1] + (1,),
                                                                    generator=g).float())
    w = w.to(BF16)
    if spice:
        w[..., :16, :32] = 0.0                        # all-zero fp8 block rows / nvfp4 groups
        w[..., 20, 5:40:3] = -0.0                     # -0.0 -> +0 byte (zero zero-point)
        w[..., 21, 0:16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0,
                                         -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0,
                                         -1e-4], dtype=BF16)
        w[..., 22, :8] = torch.tensor([448, 17, 19, 1.0625, -17, 3 * 2**-10, 2**-10, -2**-12],
                                      dtype=BF16)
    return w


def _ct_stacked(w: torch.Tensor, scheme: str, global_amax=None) -> dict[str, torch.Tensor]:
    if w.dim() == 2:
        return ct_compress(w, scheme, global_amax)
    amaxes = [None] * len(w) if global_amax is None else list(global_amax.reshape(-1).expand(len(w)))
    outs = [ct_compress(w_e, scheme, a) for w_e, a in zip(w, amaxes)]
    return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


def _assert_same_bytes(got: dict, want: dict):
    assert set(got) == set(want), (set(got), set(want))
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype, (key, g.dtype, w.dtype)
        assert g.numel() == w.numel(), (key, g.shape, w.shape)
        gb, wb = g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)
        mismatch = (gb.reshape(-1) != wb.reshape(-1)).sum().item()
        assert mismatch == 0, f"{key}: {mismatch} bytes differ"


# not multiples of the 128-block / of the kernels' tiles; fp8_channel spans 3 K-chunks of 512
SHAPES = {"fp8_block": (200, 300), "fp8_channel": (24, 1100), "int8": (24, 1100), "nvfp4": (40, 272)}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_2d_matches_compressed_tensors(scheme):
    w = _weight(SHAPES[scheme], seed=2)
    got = tk.quantize_triton(w, scheme)
    assert got["weight" if scheme != "nvfp4" else "weight_packed"].shape[0] == w.shape[0]
    _assert_same_bytes(got, _ct_stacked(w, scheme))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_stacked_experts_one_launch(scheme):
    w = _weight((3,) + SHAPES[scheme], seed=3)
    w[1] *= 64  # experts with different ranges get different global scales
    got = tk.quantize_triton(w, scheme)
    _assert_same_bytes(got, _ct_stacked(w, scheme))


def test_nvfp4_given_global_amax_and_ties_at_unit_scale():
    # amax 6 -> global scale 448 and group scale 448, so w / scale_eff == w: exact ties
    w = _weight((3, 24, 64), seed=4)
    shared = torch.tensor(6.0)
    got = tk.quantize_triton(w, "nvfp4", global_amax=shared)
    assert got["weight_global_scale"].flatten().tolist() == [448.0] * 3
    _assert_same_bytes(got, _ct_stacked(w, "nvfp4", shared))
    per_expert = w.abs().amax(dim=(1, 2)) * 2
    _assert_same_bytes(tk.quantize_triton(w, "nvfp4", global_amax=per_expert),
                       _ct_stacked(w, "nvfp4", per_expert))


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 2688 / tiny -> inf -> 1.0
def test_all_zero_weight():
    w = torch.zeros(2, 16, 160, dtype=BF16)
    for scheme in SCHEMES:
        _assert_same_bytes(tk.quantize_triton(w, scheme), _ct_stacked(w, scheme))


def test_non_contiguous_weight_view():
    w = _weight((130, 96), seed=5).t()  # (96, 130) transposed view
    for scheme in ("fp8_block", "fp8_channel", "int8"):
        _assert_same_bytes(tk.quantize_triton(w, scheme), _ct_stacked(w.contiguous(), scheme))


# --- fused merge + quantize -------------------------------------------------------------

def _lora(w: torch.Tensor, rank: int, seed: int, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    lead = w.shape[:-2]
    N, K = w.shape[-2:]
    a = (torch.randn(lead + (rank, K), generator=g) / K**0.5).to(dtype)
    b = (torch.randn(lead + (N, rank), generator=g) * 0.05).to(dtype)
    return a, b


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_quantize_equals_quantize_of_reference_merge(scheme):
    w = _weight((2,) + SHAPES[scheme], seed=6)
    a, b = _lora(w, rank=16, seed=7)
    scaling = 2.0 / 16**0.5  # rslora-style, not a power of two: the rounding order matters
    got = tk.merge_quantize_triton(w, a, b, scaling, scheme)
    merged = tk.merge_lora_reference(w, a, b, scaling)
    assert not torch.equal(merged, w)
    _assert_same_bytes(got, _ct_stacked(merged, scheme))


@pytest.mark.parametrize("scheme", ["fp8_block", "nvfp4"])
def test_merge_quantize_2d_fp32_lora(scheme):
    w = _weight(SHAPES[scheme], seed=8)
    a, b = _lora(w, rank=5, seed=9, dtype=torch.float32)
    got = tk.merge_quantize_triton(w, a, b, 0.7, scheme)
    _assert_same_bytes(got, _ct_stacked(tk.merge_lora_reference(w, a, b, 0.7), scheme))


def test_reference_merge_agrees_with_matmul_formula_on_these_inputs():
    """The documented contract vs the textbook formula: equal here (fixed seed); the two
    can differ only where BLAS's summation order flips a bf16 rounding."""
    w = _weight((2, 64, 96), seed=10, spice=False)
    a, b = _lora(w, rank=16, seed=11)
    scaling = 0.5
    textbook = (w.float() + scaling * (b.float() @ a.float())).to(BF16)
    assert torch.equal(tk.merge_lora_reference(w, a, b, scaling), textbook)


def test_merge_with_wrong_scaling_is_detected():
    """The byte comparison is not vacuous: a slightly different scaling changes bytes."""
    w = _weight((64, 96), seed=12, spice=False)
    a, b = _lora(w, rank=16, seed=13)
    got = tk.merge_quantize_triton(w, a, b, 1.0, "fp8_block")
    want = _ct_stacked(tk.merge_lora_reference(w, a, b, 1.001), "fp8_block")
    with pytest.raises(AssertionError):
        _assert_same_bytes(got, want)


# --- API edges --------------------------------------------------------------------------

def test_int8_rint_ties_and_clamp():
    # Rows whose amax is 127.5 have scale 1.0, so w / scale == w and only the integer rounding
    # (ties to even) and the clamp decide; the INT8_GOLDEN row of test_golden.py, in a kernel.
    row = [127.5, 0.5, 1.5, 2.5, -0.5, -1.5, -127.5, 0.0] + [0.0] * 8
    w = torch.tensor([row, [0.0] * 16], dtype=BF16)
    got = tk.quantize_triton(w, "int8")
    assert got["weight"][0, :8].tolist() == [127, 0, 2, 2, 0, -2, -128, 0]
    assert got["weight_scale"].flatten().tolist() == [1.0, 2.0**-7]
    _assert_same_bytes(got, _ct_stacked(w, "int8"))


def test_triton_available_only_for_cuda_bf16():
    assert not tk.triton_available(torch.zeros(4, 4, dtype=BF16))


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        tk.quantize_triton(torch.zeros(4, 24, dtype=BF16), "nvfp4")  # K % 16
    with pytest.raises(ValueError):
        tk.quantize_triton(torch.zeros(4, 16, dtype=torch.float16), "fp8_block")
    with pytest.raises(ValueError):
        tk.quantize_triton(torch.zeros(4, 16, dtype=BF16), "int4")
    w = torch.zeros(2, 8, 16, dtype=BF16)
    with pytest.raises(ValueError):
        tk.merge_quantize_triton(w, torch.zeros(2, 4, 16), torch.zeros(2, 8, 3), 1.0, "nvfp4")


def test_matches_quantization_core():
    import qerl_rollout.quant as core

    for scheme in SCHEMES:
        w = _weight((2,) + SHAPES[scheme], seed=14)
        _assert_same_bytes(tk.quantize_triton(w, scheme), core.quantize(w, scheme).compressed())
        w2 = w[0]
        _assert_same_bytes(tk.quantize_triton(w2, scheme), core.quantize(w2, scheme).compressed())
        a, b = _lora(w, rank=4, seed=15)
        merged = tk.merge_lora_reference(w, a, b, 0.3)
        _assert_same_bytes(tk.merge_quantize_triton(w, a, b, 0.3, scheme),
                           core.quantize(merged, scheme).compressed())
    amax = torch.tensor([3.0, 0.5])
    w = _weight((2, 24, 64), seed=16)
    _assert_same_bytes(tk.quantize_triton(w, "nvfp4", global_amax=amax),
                       core.quantize(w, "nvfp4", global_amax=amax).compressed())


def test_a_kernel_is_verified_once_against_the_twin_and_dropped_on_mismatch(monkeypatch, caplog):
    import logging

    import qerl_rollout.quant.core as core

    monkeypatch.setattr(core, "_TRITON_VERIFIED", {})
    w = _weight((2, 300, 160), seed=21)
    assert core._triton_verified(w, "int8", None) is True          # the real kernel agrees

    def one_byte_off(*args, **kwargs):
        out = tk.quantize_triton(*args, **kwargs)
        out["weight"].view(torch.uint8).view(-1)[3] ^= 1
        return out

    monkeypatch.setattr(core, "quantize_triton", one_byte_off)
    with caplog.at_level(logging.WARNING, logger="qerl_rollout.quant.core"):
        assert core._triton_verified(w, "fp8_channel", None) is False
        assert core._triton_verified(w, "fp8_channel", None) is False   # cached: one warning
    assert [r.getMessage() for r in caplog.records].count(
        "qerl_rollout.quant: Triton fp8_channel kernel not used on cpu: its bytes differ from the torch twin's") == 1
    assert core._TRITON_VERIFIED == {("int8", "cpu"): True, ("fp8_channel", "cpu"): False}
