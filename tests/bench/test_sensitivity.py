"""`bench sensitivity`: the variants by hand, the KL against an independent QDQ copy, the advice."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qerl_rollout.bench.sensitivity import _compare, _score, main, sensitivity, suggest, variants
from qerl_rollout.quant.plan import build_plan
from qerl_rollout.sync.verify import qdq_copy


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    from qerl_rollout.tiny import build_tiny_model

    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("sens") / "m", num_hidden_layers=4)


def test_variants_by_hand(four_layers):
    plan = build_plan(AutoModelForCausalLM.from_pretrained(four_layers).config, "int8")
    v = variants(plan, 4)
    # Per layer: q, k, v, o and the two fused expert tensors.
    assert [len(v[f"layer {i}"]) for i in range(4)] == [6] * 4
    assert v["targets experts"] == v["kind expert"] and len(v["kind expert"]) == 8
    assert v["bf16_layers 0"] == v["targets all_linear"] == set().union(*(v[f"layer {i}"] for i in range(4)))
    assert v["bf16_layers 1"] == v["layer 1"] | v["layer 2"]
    assert "bf16_layers 2" not in v                       # it would keep every layer BF16


def test_the_kl_of_everything_is_that_of_the_qdq_copy_and_weights_come_back(four_layers):
    model = AutoModelForCausalLM.from_pretrained(four_layers, dtype=torch.bfloat16).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = {r["variant"]: r for r in sensitivity(model, "int8", ids)}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())   # restored exactly
    copy = qdq_copy(model, "int8").eval()
    kl, flips = _compare(_score(model, ids), _score(copy, ids))
    assert (rows["bf16_layers 0"]["kl"], rows["bf16_layers 0"]["flip_rate"]) == (kl, flips)
    assert kl > 0 and rows["bf16_layers 1"]["kl"] < kl     # BF16 at both ends is closer


def test_a_recipe_is_the_mixed_plans_qdq_copy(four_layers):
    """`--recipe`: an override naming the run's own scheme is the all-quantized variant exactly;
    another scheme on the experts is the QDQ copy of that mixed plan, exactly."""
    from qerl_rollout.quant.plan import Precision

    model = AutoModelForCausalLM.from_pretrained(four_layers, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = {r["variant"]: r for r in sensitivity(model, "int8", ids, ("experts=int8", "experts=nvfp4"))}
    assert rows["recipe experts=int8"]["kl"] == rows["bf16_layers 0"]["kl"]
    mixed = build_plan(model.config, "int8", Precision(overrides=(("experts", "nvfp4"),)))
    kl, flips = _compare(_score(model, ids), _score(qdq_copy(model, "int8", mixed).eval(), ids))
    assert (rows["recipe experts=nvfp4"]["kl"], rows["recipe experts=nvfp4"]["flip_rate"]) == (kl, flips)
    assert kl != rows["bf16_layers 0"]["kl"]
    with pytest.raises(ValueError, match="router is never quantized"):
        sensitivity(model, "int8", ids, ("router=int8",))


def test_suggest_by_hand():
    rows = [{"variant": "targets experts", "kl": 1e-4}, {"variant": "targets experts_attention", "kl": 5e-4},
            {"variant": "targets all_linear", "kl": 2e-3}, {"variant": "bf16_layers 0", "kl": 2e-3},
            {"variant": "bf16_layers 1", "kl": 8e-4}, {"variant": "bf16_layers 2", "kl": 3e-4}]
    assert suggest(rows, 1e-3) == ["rollout.quant_targets=experts_attention", "rollout.bf16_layers=1 (with all_linear)"]
    assert suggest(rows, 1e-5)[0].startswith("no quant_targets keeps KL <= 1e-05")
    assert suggest(rows, 1e-5)[1] == "no bf16_layers up to 2 keeps all_linear within 1e-05"


def test_the_command_writes_its_table_json_and_plot(four_layers, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["--model", str(four_layers), "--rows", "2", "--tokens", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "sensitivity" and len(result["variants"]) == 11 and len(result["suggest"]) == 2
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "KL(q || bf16)" in capsys.readouterr().out
