"""The C++ dequantizers (what an emulate-mode engine runs on every pushed layer) equal the
torch twin bit for bit: every e4m3 byte and every packed E2M1 pair, bf16 and fp16 outputs,
whole and partial 128x128 blocks, and per-row scales. NaN codes (0x7F, 0xFF) decode to NaN."""

from __future__ import annotations

import pytest
import torch

from qerl_rollout.quant import quantize
from qerl_rollout.quant.kernels import cpu, reference


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = torch.isnan(b)
    return torch.equal(torch.isnan(a), nan) and torch.equal(a[~nan].view(torch.int16),
                                                            b[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, block", [((3, 200, 300), (128, 128)), ((2, 256, 512), (128, 128)),
                                          ((2, 64, 300), (1, 300))])
def test_fp8_dequantize_equals_the_twin(dtype, shape, block):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)     # every byte at least once
    w_fp8 = codes.view(torch.float8_e4m3fn)
    nsb = (shape[0], -(-shape[1] // block[0]), -(-shape[2] // block[1]))
    scale = (torch.rand(nsb, generator=g) * 0.1 + 1e-4).to(dtype)
    assert _same_bits(cpu.fp8_dequantize(w_fp8, scale, block), reference.fp8_dequantize(w_fp8, scale, block))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nvfp4_dequantize_equals_the_twin(dtype):
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (2, 40, 64), dtype=torch.uint8, generator=g)
    packed.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)    # every nibble pair
    scale = torch.randint(0, 0x7F, (2, 40, 8), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    global_scale = torch.tensor([448 * 6 / 0.3, 448 * 6 / 0.07])
    assert _same_bits(cpu.nvfp4_dequantize(packed, scale, global_scale, dtype),
                      reference.nvfp4_dequantize(packed, scale, global_scale, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_dequantize_equals_the_twin(dtype):
    w = (torch.randn(3, 200, 300) * 3).to(dtype)
    w_int8, scale = reference.int8(w)
    assert _same_bits(cpu.int8_dequantize(w_int8, scale), reference.int8_dequantize(w_int8, scale))


@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_channel", "int8", "nvfp4"])
def test_quantized_weight_dequantize_uses_a_path_equal_to_the_twin(scheme):
    w = (torch.randn(4, 192, 256) * 0.02).to(torch.bfloat16)
    qw = quantize(w, scheme)
    c = qw.compressed()
    if scheme == "nvfp4":
        twin = reference.nvfp4_dequantize(c["weight_packed"], c["weight_scale"],
                                          c["weight_global_scale"].reshape(-1), torch.bfloat16)
    elif scheme == "int8":
        twin = reference.int8_dequantize(c["weight"], c["weight_scale"])
    else:
        block = (128, 128) if scheme == "fp8_block" else (1, 256)
        twin = reference.fp8_dequantize(c["weight"], c["weight_scale"], block)
    assert _same_bits(qw.dequantize(), twin)
    # A flipped byte changes the result: the comparison can fail.
    broken = dict(c)
    key = "weight_packed" if scheme == "nvfp4" else "weight"
    broken[key] = c[key].view(torch.uint8).clone()
    broken[key].view(-1)[7] ^= 0x11
    broken[key] = broken[key].view(c[key].dtype)
    assert not _same_bits(type(qw)(scheme, qw.shape, qw.dtype, broken).dequantize(), twin)
