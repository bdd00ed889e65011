"""The C++ fast path equals its plain torch twin bit for bit, and catches NaN/Inf as it reads."""

from __future__ import annotations

import pytest
import torch

from qerl_rollout.quant.kernels import cpu, reference


def test_the_cpp_kernels_build_here():
    # g++ is part of this machine's setup; if the build fails every fast-path test below would
    # silently test the fallback, so fail loudly instead.
    assert cpu.available(), "the C++ kernels did not build (see the warning logged by cpu.py)"


SHAPES = [(1, 128, 128), (3, 256, 512), (2, 200, 304), (1, 130, 48), (2, 33, 16), (1, 1, 4096), (1, 3, 7)]


def _weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand((shape[0], 1, 1), generator=g) * 3
    w = w.to(dtype)
    w[:, 2:, 3:6] = 0.0
    w[0, 0, :4] = torch.tensor([-0.0, 0.0, -1e-7, 1e-7], dtype=dtype)
    return w


def _random_bits(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int32).to(torch.int16)
    w = bits.view(dtype)
    return torch.where(torch.isfinite(w), w, torch.zeros((), dtype=dtype))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("make", [_weights, _random_bits])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_fast_equals_twin(shape, dtype, make):
    w = make(shape, dtype, seed=sum(shape))
    eps = reference.fp8_scale_eps(dtype)
    for block in [(128, 128), (1, shape[-1])]:
        fast, twin = cpu.fp8(w, block, eps), reference.fp8(w, block)
        assert _same(fast[0], twin[0]) and _same(fast[1], twin[1]), block


@pytest.mark.parametrize("make", [_weights, _random_bits])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[-1] % 16 == 0])
def test_nvfp4_fast_equals_twin(shape, dtype, make):
    w = make(shape, dtype, seed=sum(shape))
    assert _same(cpu.absmax(w), reference.absmax(w))
    own = reference.nvfp4_global_scale(reference.absmax(w))
    for global_scale in (own, torch.full((shape[0],), 1e6), torch.full((shape[0],), 1e-3)):
        fast, twin = cpu.nvfp4(w, global_scale), reference.nvfp4(w, global_scale)
        assert _same(fast[0], twin[0]) and _same(fast[1], twin[1])


@pytest.mark.parametrize("make", [_weights, _random_bits])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_fast_equals_twin(shape, dtype, make):
    w = make(shape, dtype, seed=sum(shape))
    fast, twin = cpu.int8(w, reference.fp8_scale_eps(dtype)), reference.int8(w)
    assert _same(fast[0], twin[0]) and _same(fast[1], twin[1])


def test_non_contiguous_input():
    w = _weights((2, 256, 128), torch.bfloat16, seed=0).transpose(1, 2)
    fast, twin = cpu.fp8(w, (128, 128), 2**-7), reference.fp8(w, (128, 128))
    assert _same(fast[0], twin[0]) and _same(fast[1], twin[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_rejects_non_finite(bad, dtype):
    w = _weights((2, 64, 256), dtype, seed=0)
    w[1, 63, 255] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        cpu.fp8(w, (128, 128), 2**-7)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cpu.fp8(w, (1, 256), 2**-7)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cpu.int8(w, 2**-7)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cpu.absmax(w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cpu.nvfp4(w, torch.ones(2))


def test_self_test_passes_here_and_catches_a_wrong_kernel(monkeypatch):
    assert cpu._self_test() == []
    real = cpu.int8

    def off_by_one(w, eps):
        q, scale = real(w, eps)
        q.view(-1)[0] += 1
        return q, scale

    monkeypatch.setattr(cpu, "int8", off_by_one)
    assert cpu._self_test() == ["int8_rows torch.bfloat16", "int8_rows torch.float16"]
