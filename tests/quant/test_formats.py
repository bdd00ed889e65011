"""Public API of qerl_rollout.quant: registry, validation, compressed() layout, global_amax."""

from __future__ import annotations

import pytest
import torch

from qerl_rollout.quant import SCHEMES, QuantizedWeight, get_scheme, quantize
from qerl_rollout.quant.formats import registry
from qerl_rollout.quant.kernels.ct_oracle import ct_scheme


def test_schemes_registered():
    assert SCHEMES == ("fp8_block", "fp8_channel", "int8", "nvfp4")
    assert all(get_scheme(name).name == name for name in SCHEMES)


def test_unknown_scheme_names_valid_ones():
    with pytest.raises(ValueError, match="fp8_block, fp8_channel, int8, nvfp4"):
        get_scheme("int4")
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'"):
        quantize(torch.zeros(16, 16, dtype=torch.bfloat16), "int4")


def test_register_decorator_adds_a_scheme():
    @registry.register
    class Dummy(registry.QuantScheme):
        name, format, preset, keys = "dummy_test", "dense", "NONE", ("weight",)

        def quantize(self, w_3d, global_amax):
            return {"weight": w_3d.clone()}

        def dequantize(self, tensors, dtype):
            return tensors["weight"].to(dtype)

        def scheme_args(self):
            return {"weights": None, "input_activations": None}

        def nbytes(self, n, k):
            return n * k * 2

    try:
        qw = quantize(torch.ones(2, 3, dtype=torch.bfloat16), "dummy_test")
        assert torch.equal(qw.dequantize(), torch.ones(2, 3, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="twice"):
            registry.register(Dummy)
    finally:
        registry._REGISTRY.pop("dummy_test")


@pytest.mark.parametrize("name", ["fp8_block", "fp8_channel", "int8", "nvfp4"])
def test_config_group_matches_compressed_tensors_preset(name):
    from compressed_tensors.quantization import QuantizationScheme

    scheme = get_scheme(name)
    group = scheme.config_group(["Linear"])
    expected = ct_scheme(name).model_dump(mode="json")
    expected["format"] = scheme.format
    assert QuantizationScheme.model_validate(group).model_dump(mode="json") == expected
    assert group == expected  # already in the serialized form
    formats = {"nvfp4": "nvfp4-pack-quantized", "int8": "int-quantized"}
    assert scheme.format == formats.get(name, "float-quantized")


EXPECTED_2D = {  # (N, K) = (300, 160)
    "fp8_block": {"weight": ((300, 160), torch.float8_e4m3fn), "weight_scale": ((3, 2), torch.bfloat16)},
    "fp8_channel": {"weight": ((300, 160), torch.float8_e4m3fn), "weight_scale": ((300, 1), torch.bfloat16)},
    "int8": {"weight": ((300, 160), torch.int8), "weight_scale": ((300, 1), torch.bfloat16)},
    "nvfp4": {
        "weight_packed": ((300, 80), torch.uint8),
        "weight_scale": ((300, 10), torch.float8_e4m3fn),
        "weight_global_scale": ((1,), torch.float32),
    },
}


@pytest.mark.parametrize("name", SCHEMES)
def test_compressed_layout_2d_and_3d(name):
    w = torch.randn(4, 300, 160).to(torch.bfloat16)
    q2 = quantize(w[0], name)
    assert isinstance(q2, QuantizedWeight) and q2.scheme == name and q2.shape == (300, 160)
    layout = {k: (tuple(v.shape), v.dtype) for k, v in q2.compressed().items()}
    assert layout == EXPECTED_2D[name]
    assert list(q2.compressed()) == list(get_scheme(name).keys)
    assert q2.nbytes == sum(v.numel() * v.element_size() for v in q2.compressed().values())
    assert q2.dequantize().shape == (300, 160) and q2.dequantize().dtype == torch.bfloat16

    q3 = quantize(w, name)
    for key, tensor in q3.compressed().items():
        assert tuple(tensor.shape) == (4, *EXPECTED_2D[name][key][0])
    for e in range(4):  # each expert exactly as if quantized alone
        alone = quantize(w[e], name).compressed()
        assert all(torch.equal(q3.compressed()[k][e].view(torch.uint8), v.view(torch.uint8))
                   for k, v in alone.items())
    assert torch.equal(q3.dequantize()[2], quantize(w[2], name).dequantize())


def test_nbytes_are_smaller():
    w = torch.randn(256, 256).to(torch.bfloat16)
    sizes = {name: quantize(w, name).nbytes for name in SCHEMES}
    assert sizes["fp8_channel"] == sizes["int8"] == 256 * 256 + 256 * 2
    assert sizes["nvfp4"] == 256 * 128 + 256 * 16 + 4


def test_fp16_input_keeps_fp16_scales():
    q = quantize(torch.randn(64, 64).half(), "fp8_block")
    assert q.compressed()["weight_scale"].dtype == torch.float16
    assert q.dequantize().dtype == torch.float16


def test_nvfp4_global_amax_shares_one_global_scale():
    q_w, k_w = torch.randn(64, 128).bfloat16(), (torch.randn(32, 128) * 4).bfloat16()
    amax = torch.maximum(q_w.abs().max(), k_w.abs().max())
    gq = quantize(q_w, "nvfp4", global_amax=amax).compressed()["weight_global_scale"]
    gk = quantize(k_w, "nvfp4", global_amax=amax).compressed()["weight_global_scale"]
    own = [quantize(x, "nvfp4").compressed()["weight_global_scale"] for x in (q_w, k_w)]
    assert torch.equal(gq, gk) and torch.equal(gq, torch.minimum(*own))  # the smaller one


def test_nvfp4_global_amax_scalar_or_per_expert():
    w = torch.randn(3, 32, 64).bfloat16()
    per_expert = w.abs().amax(dim=(1, 2))
    assert torch.equal(quantize(w, "nvfp4", global_amax=per_expert).compressed()["weight_packed"],
                       quantize(w, "nvfp4").compressed()["weight_packed"])
    gs = quantize(w, "nvfp4", global_amax=per_expert.max()).compressed()["weight_global_scale"]
    assert gs.shape == (3, 1) and bool((gs == gs[0]).all())
    with pytest.raises(ValueError, match="global_amax"):
        quantize(w, "nvfp4", global_amax=torch.ones(2))
    with pytest.raises(ValueError, match="global_amax"):
        quantize(w, "nvfp4", global_amax=torch.tensor(float("nan")))


def test_fp8_ignores_global_amax():
    w = torch.randn(64, 64).bfloat16()
    a = quantize(w, "fp8_block", global_amax=torch.tensor(100.0)).compressed()["weight"]
    assert torch.equal(a.view(torch.uint8), quantize(w, "fp8_block").compressed()["weight"].view(torch.uint8))


@pytest.mark.parametrize(
    "w,match",
    [
        (torch.zeros(16, 16, dtype=torch.int32), "bfloat16/float16/float32"),
        (torch.zeros(16, 16, dtype=torch.float8_e4m3fn), "bfloat16/float16/float32"),
        (torch.zeros(16, dtype=torch.bfloat16), "2-D"),
        (torch.zeros(2, 2, 16, 16, dtype=torch.bfloat16), "2-D"),
        (torch.zeros(0, 16, dtype=torch.bfloat16), "empty"),
    ],
)
def test_invalid_inputs(w, match):
    for name in SCHEMES:
        with pytest.raises(ValueError, match=match):
            quantize(w, name)


def test_nvfp4_rejects_partial_groups():
    with pytest.raises(ValueError, match="divisible by 16"):
        quantize(torch.randn(16, 40).bfloat16(), "nvfp4")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fast path and torch twin
def test_corrupted_input_is_caught(name, bad, dtype):
    w = torch.randn(2, 64, 128).to(dtype)
    w[1, 10, 20] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(w, name)
