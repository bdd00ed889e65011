"""export_checkpoint / python -m qerl_rollout.quantize: compressed-tensors reads back our numbers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qerl_rollout.quant import quantize
from qerl_rollout.quant.export import ExportError, export_checkpoint
from qerl_rollout.quant.plan import build_plan_from_checkpoint
from qerl_rollout.quantize import main as cli_main

SCHEMES = ["fp8_block", "fp8_channel", "int8", "nvfp4"]
COMPRESSED_KEYS = {
    "int8": {"weight": torch.int8, "weight_scale": torch.bfloat16},
    "fp8_block": {"weight": torch.float8_e4m3fn, "weight_scale": torch.bfloat16},
    "fp8_channel": {"weight": torch.float8_e4m3fn, "weight_scale": torch.bfloat16},
    "nvfp4": {
        "weight_packed": torch.uint8,
        "weight_scale": torch.float8_e4m3fn,
        "weight_global_scale": torch.float32,
    },
}


def _read_all(model_dir):
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _reference_dequantized(model_dir, scheme):
    """Our own dequantized weights, each fused group's shared amax from `plan.group_amax`."""
    plan = build_plan_from_checkpoint(model_dir, scheme)
    src = _read_all(model_dir)
    out = {}
    for name, w in src.items():
        if not plan.for_checkpoint(name).quantized:
            continue
        group = {g: src[g].abs().amax() for g in plan.group_of(name)}
        out[name] = quantize(w, scheme, global_amax=plan.group_amax(group)[name]).dequantize()
    return plan, src, out


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """Factory: (family, scheme) -> exported dir, cached for the module."""
    cache = {}
    root = tmp_path_factory.mktemp("exported")

    def get(family, scheme):
        if (family, scheme) not in cache:
            out = root / f"{family}-{scheme}"
            export_checkpoint(tiny_model(family), out, scheme, progress=False)
            cache[family, scheme] = out
        return cache[family, scheme]

    return get


def _ct_decompress(out_dir):
    """Dequantize an exported dir with compressed-tensors alone (config, ignore list, compressor).

    Mirrors compressed-tensors' model-free CompressedTensorsDequantizer, except that block
    scales are dequantized with the config's QuantizationArgs: its compressor infers the
    strategy from the scale's shape and misreads a (1, n) block scale (a weight of <= 128
    rows, e.g. k_proj here) as column groups.
    """
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.utils.match import match_quantizable_tensors

    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    (scheme,) = config.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    params = compressor.compression_param_names(scheme)
    tensors = _read_all(out_dir)
    out = {}
    for module, _ in list(
        match_quantizable_tensors(tensors, config.ignore, scheme.targets, [params[0]])
    ):
        state = {p: tensors.pop(f"{module}.{p}") for p in params}
        if scheme.weights.strategy == "block":
            w = dequantize(state["weight"], state["weight_scale"], args=scheme.weights)
        else:
            w = compressor.decompress(state, scheme)["weight"]
        out[f"{module}.weight"] = w.to(torch.bfloat16)
    return {**tensors, **out}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_tensors_decompresses_to_our_weights(scheme, tiny_model, exported):
    out = exported("qwen3_moe", scheme)
    _, src, ours = _reference_dequantized(tiny_model("qwen3_moe"), scheme)
    theirs = _ct_decompress(out)
    assert set(theirs) == set(src)
    for name, w in ours.items():
        assert torch.equal(theirs[name], w), name
        assert not torch.equal(theirs[name], src[name]), name  # really quantized
    for name in src.keys() - ours.keys():
        assert torch.equal(theirs[name], src[name]), name


def test_compressed_tensors_model_free_dequantizer_on_nvfp4(tiny_model, exported):
    """compressed-tensors' own model-free dequantizer, unmodified, on an NVFP4 export."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer,
    )

    out = exported("qwen3_moe", "nvfp4")
    _, src, ours = _reference_dequantized(tiny_model("qwen3_moe"), "nvfp4")
    theirs = CompressedTensorsDequantizer(out, dtype=torch.bfloat16).process(_read_all(out))
    assert set(theirs) == set(src)
    assert all(torch.equal(theirs[n], w) for n, w in ours.items())


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_written_tensors_follow_the_plan(family, tiny_model, exported):
    scheme = "nvfp4"
    out = exported(family, scheme)
    plan = build_plan_from_checkpoint(tiny_model(family), scheme)
    src, written = _read_all(tiny_model(family)), _read_all(out)
    expected_keys = set()
    for name, w in src.items():
        if plan.for_checkpoint(name).quantized:
            module = name.removesuffix(".weight")
            for suffix, dtype in COMPRESSED_KEYS[scheme].items():
                expected_keys.add(f"{module}.{suffix}")
                assert written[f"{module}.{suffix}"].dtype == dtype, (name, suffix)
        else:
            expected_keys.add(name)
            assert written[name].dtype == w.dtype and torch.equal(written[name], w), name
    assert set(written) == expected_keys
    # every fused group (q/k/v, an expert's gate/up) shares one global scale; groups differ
    scales = {}
    for group in plan.fused_groups:
        gs = [written[g.removesuffix(".weight") + ".weight_global_scale"] for g in group]
        assert all(torch.equal(gs[0], g) for g in gs[1:]), group
        scales[group] = gs[0].item()
    assert len(set(scales.values())) > 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_config_and_side_files(scheme, tiny_model, exported):
    out = exported("mixtral", scheme)
    src_dir = tiny_model("mixtral")
    config = json.loads((out / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == json.loads((src_dir / "config.json").read_text())
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["ignore"] == [
        r"re:^model\.embed_tokens$",
        r"re:^model\.layers\.\d+\.block_sparse_moe\.gate$",
        r"re:^lm_head$",
    ]
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ):
        assert (out / name).read_bytes() == (src_dir / name).read_bytes()
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    parsed = QuantizationConfig.model_validate(qc)
    preset = {"fp8_block": "FP8_BLOCK", "fp8_channel": "FP8_DYNAMIC", "nvfp4": "NVFP4A16",
              "int8": "W8A8"}[scheme]
    expected = preset_name_to_scheme(preset, ["Linear"])
    assert parsed.config_groups["group_0"].weights == expected.weights
    assert parsed.config_groups["group_0"].input_activations == expected.input_activations


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_vllm_parses_config_and_ignores_routers(family, exported):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    class GateLinear(torch.nn.Module):  # vLLM's router class name: matched by the "Linear" target
        pass

    qc = json.loads((exported(family, "nvfp4") / "config.json").read_text())["quantization_config"]
    cfg = CompressedTensorsConfig.from_config(qc)
    cfg.packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    layer = GateLinear()
    assert cfg.get_scheme_dict(layer, "model.layers.1.mlp.gate") is None
    assert cfg.get_scheme_dict(layer, "lm_head") is None
    assert cfg.get_scheme_dict(layer, "model.layers.1.self_attn.o_proj") is not None
    if family == "deepseek_v3":  # dense layer 0's gate_up_proj is not caught by the router pattern
        assert cfg.get_scheme_dict(layer, "model.layers.0.mlp.gate_up_proj") is not None
    if family == "qwen2_moe":
        assert cfg.get_scheme_dict(layer, "model.layers.1.mlp.shared_expert_gate") is None
        assert cfg.get_scheme_dict(layer, "model.layers.1.self_attn.qkv_proj") is not None
    # negative control: without the ignore list the router would be quantized
    unignored = CompressedTensorsConfig.from_config({**qc, "ignore": []})
    assert unignored.get_scheme_dict(layer, "model.layers.1.mlp.gate") is not None


def test_sharded_output_has_index(tiny_model, tmp_path):
    out = tmp_path / "sharded"
    export_checkpoint(
        tiny_model("qwen3_moe"), out, "fp8_channel", max_shard_bytes=1 << 20, progress=False
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(_read_all(out))
    assert not list(out.glob("*.tmp"))


# ------------------------------------ bad input ------------------------------------------


def _copy_with(tiny_dir, dst, change):
    shutil.copytree(tiny_dir, dst)
    tensors = _read_all(dst)
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_fp32_checkpoint_is_rejected(tiny_model, tmp_path):
    src = _copy_with(
        tiny_model("qwen3_moe"),
        tmp_path / "fp32",
        lambda t: t.update({k: v.float() for k, v in t.items()}),
    )
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"model\.\S+ is F32; quantization needs BF16 or FP16"):
        export_checkpoint(src, out, "fp8_block", progress=False)
    _assert_nothing_written(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_names_the_tensor(bad, tiny_model, tmp_path):
    name = "model.layers.1.mlp.experts.5.up_proj.weight"

    def poison(t):
        t[name][3, 7] = bad

    src = _copy_with(tiny_model("qwen3_moe"), tmp_path / "nan", poison)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=f"{name} contains NaN or Inf"):
        export_checkpoint(src, out, "nvfp4", progress=False)
    _assert_nothing_written(out)


def test_missing_inputs(tiny_model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", out, "nvfp4")
    no_weights = tmp_path / "noweights"
    shutil.copytree(tiny_model("qwen3"), no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="no .safetensors files"):
        export_checkpoint(no_weights, out, "nvfp4")
    (no_weights / "config.json").unlink()
    with pytest.raises(ExportError, match="no config.json"):
        export_checkpoint(no_weights, out, "nvfp4")
    _assert_nothing_written(out)


def test_missing_or_extra_tensor(tiny_model, tmp_path):
    src = _copy_with(
        tiny_model("qwen3"),
        tmp_path / "missing",
        lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
    )
    with pytest.raises(ExportError, match="checkpoint lacks tensors.*layers.1.mlp.up_proj"):
        export_checkpoint(src, tmp_path / "out", "nvfp4")
    _assert_nothing_written(tmp_path / "out")


def test_unknown_scheme_and_existing_out(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="unknown scheme 'int4'"):
        export_checkpoint(tiny_model("qwen3"), tmp_path / "out", "int4")
    _assert_nothing_written(tmp_path / "out")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match="exists"):
        export_checkpoint(tiny_model("qwen3"), existing, "nvfp4")
    assert (existing / "keep.txt").read_text() == "old"
    export_checkpoint(tiny_model("qwen3"), existing, "nvfp4", overwrite=True, progress=False)
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_cli(tiny_model, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--model", str(tiny_model("qwen3")), "--scheme", "fp8_block", "--out", str(out)]
    assert cli_main(args) == 0
    assert "dense_mlp" in capsys.readouterr().out
    assert (out / "config.json").is_file()
    assert cli_main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    with pytest.raises(SystemExit):
        cli_main(["--model", "x", "--scheme", "int4", "--out", "y"])


def test_a_mixed_export_holds_each_kinds_single_scheme_export(tiny_model, exported, tmp_path):
    """`rollout.quant_overrides` in one checkpoint: each module's tensors are byte for byte
    those of the single-scheme export of its scheme (each bit-exact with compressed-tensors
    above), the config has one group per scheme, and vLLM maps every layer to its group."""
    from compressed_tensors.quantization import QuantizationConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    from qerl_rollout.quant.plan import Precision

    family = "deepseek_v3"           # attention (MLA), a dense MLP layer, routed + shared experts
    precision = Precision(overrides=(("experts", "nvfp4"), ("dense_mlp", "int8")))
    out = tmp_path / "mixed"
    export_checkpoint(tiny_model(family), out, "fp8_block", progress=False, precision=precision)
    plan = build_plan_from_checkpoint(tiny_model(family), "fp8_block", precision)
    written = _read_all(out)
    single = {s: _read_all(exported(family, s)) for s in ("fp8_block", "nvfp4", "int8")}
    kinds = set()
    for name in plan.checkpoint_names():
        d = plan.for_checkpoint(name)
        scheme = d.scheme or "fp8_block"    # exempt tensors: the same in every export
        keys = [f"{name.removesuffix('.weight')}.{k}" for k in COMPRESSED_KEYS[scheme]] if d.quantized else [name]
        for key in keys:
            assert written[key].dtype == single[scheme][key].dtype, key
            assert torch.equal(written[key], single[scheme][key]), key
        kinds.add((d.category, d.scheme))
    assert {("expert", "nvfp4"), ("shared_expert", "nvfp4"), ("dense_mlp", "int8"),
            ("attention", "fp8_block"), ("router", None)} <= kinds

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 3
    QuantizationConfig.model_validate(qc)       # compressed-tensors accepts it
    cfg = CompressedTensorsConfig.from_config(qc)
    cfg.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"],
                                  "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]}
    layer = torch.nn.Linear(1, 1)

    def weights_of(vllm_name):
        scheme_dict = cfg.get_scheme_dict(layer, vllm_name)
        return None if scheme_dict is None else scheme_dict["weights"]

    groups = {s: QuantizationConfig.model_validate(json.loads((exported(family, s) / "config.json").read_text())
                                                   ["quantization_config"]).config_groups["group_0"].weights
              for s in ("fp8_block", "nvfp4", "int8")}
    assert weights_of("model.layers.1.mlp.experts.0.gate_proj") == groups["nvfp4"]   # what vLLM's MoE asks
    assert weights_of("model.layers.1.mlp.shared_experts.gate_up_proj") == groups["nvfp4"]
    assert weights_of("model.layers.0.mlp.gate_up_proj") == groups["int8"]
    assert weights_of("model.layers.1.self_attn.o_proj") == groups["fp8_block"]
    assert weights_of("model.layers.1.self_attn.fused_qkv_a_proj") == groups["fp8_block"]
    assert weights_of("model.layers.1.mlp.gate") is None and weights_of("lm_head") is None
