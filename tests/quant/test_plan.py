"""QuantPlan: structural router detection, checkpoint naming, fused groups, ignore patterns."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qerl_rollout.quant.plan import (
    Precision,
    RouterNotFoundError,
    build_plan,
    build_plan_from_checkpoint,
)
from qerl_rollout.tiny import tiny_config

MOE_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"]

# Checkpoint names (as save_pretrained / vLLM write them) of layer 1, by category.
ROUTERS = {
    "qwen3_moe": ["model.layers.1.mlp.gate.weight"],
    "qwen2_moe": ["model.layers.1.mlp.gate.weight"],
    "mixtral": ["model.layers.1.block_sparse_moe.gate.weight"],
    "deepseek_v3": [
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
    ],
}
EXPERT_GATES = {  # the experts' gate projections: look like "gate", must be quantized
    "qwen3_moe": "model.layers.1.mlp.experts.3.gate_proj.weight",
    "qwen2_moe": "model.layers.1.mlp.experts.3.gate_proj.weight",
    "mixtral": "model.layers.1.block_sparse_moe.experts.3.w1.weight",
    "deepseek_v3": "model.layers.1.mlp.experts.3.gate_proj.weight",
}
IGNORE = {
    "qwen3_moe": [
        r"re:^model\.embed_tokens$",
        r"re:^model\.layers\.\d+\.mlp\.gate$",
        r"re:^lm_head$",
    ],
    "qwen2_moe": [
        r"re:^model\.embed_tokens$",
        r"re:^model\.layers\.\d+\.mlp\.gate$",
        r"re:^model\.layers\.\d+\.mlp\.shared_expert_gate$",
        r"re:^lm_head$",
    ],
    "mixtral": [
        r"re:^model\.embed_tokens$",
        r"re:^model\.layers\.\d+\.block_sparse_moe\.gate$",
        r"re:^lm_head$",
    ],
    # layer 0 is dense: its mlp.gate_proj must not be caught by the folded router pattern
    "deepseek_v3": [
        r"re:^model\.embed_tokens$",
        r"re:^model\.layers\.\d+\.mlp\.gate$",
        r"re:^lm_head$",
    ],
    "qwen3": [r"re:^model\.embed_tokens$", r"re:^lm_head$"],
}
# {category: (n_quantized, n_exempt)} over all trainer tensors (2 layers each).
COUNTS = {
    "qwen3_moe": {
        "attention": (8, 0),
        "expert": (4, 0),
        "router": (0, 2),
        "lm_head": (0, 1),
        "embedding": (0, 1),
        "norm": (0, 9),
    },
    "qwen2_moe": {
        "attention": (8, 0),
        "expert": (4, 0),
        "shared_expert": (6, 0),
        "router": (0, 2),
        "shared_expert_gate": (0, 2),
        "lm_head": (0, 1),
        "embedding": (0, 1),
        "norm": (0, 5),
        "bias": (0, 6),
    },
    "mixtral": {
        "attention": (8, 0),
        "expert": (4, 0),
        "router": (0, 2),
        "lm_head": (0, 1),
        "embedding": (0, 1),
        "norm": (0, 5),
    },
    "deepseek_v3": {
        "attention": (8, 0),
        "expert": (2, 0),
        "dense_mlp": (3, 0),
        "shared_expert": (3, 0),
        "router": (0, 2),
        "lm_head": (0, 1),
        "embedding": (0, 1),
        "norm": (0, 7),
    },
    "qwen3": {
        "attention": (8, 0),
        "dense_mlp": (6, 0),
        "lm_head": (0, 1),
        "embedding": (0, 1),
        "norm": (0, 9),
    },
}


def _file_tensors(model_dir):
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES + ["qwen3"])
def test_categories_and_counts(family, tiny_model):
    plan = build_plan_from_checkpoint(tiny_model(family), "nvfp4")
    counts = {c: (nq, ne) for c, (nq, _, ne, _) in plan.summary_counts().items()}
    assert counts == COUNTS[family]
    for name in ROUTERS.get(family, []):
        d = plan.for_checkpoint(name)
        assert (d.category, d.quantized) == ("router", False), name
    assert plan.ignore_patterns() == IGNORE[family]
    text = plan.summary()
    assert "router" in text if family != "qwen3" else "router" not in text


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gate_proj_and_gate_up_proj_are_quantized(family):
    plan = build_plan(tiny_config(family), "fp8_block")
    gate_up = plan["model.layers.1.mlp.experts.gate_up_proj"]
    assert (gate_up.category, gate_up.quantized) == ("expert", True)
    assert plan.for_checkpoint(EXPERT_GATES[family]).quantized
    for d in plan.decisions.values():
        if d.name.endswith(("gate_proj.weight", "gate_up_proj", "w1.weight")):
            assert d.quantized, d.name
    # an ignore pattern never matches a quantized module
    quantized_modules = [
        ck.rpartition(".")[0] for d in plan.quantized() for ck in d.checkpoint_names
    ]
    for pattern in plan.ignore_patterns():
        assert not any(re.match(pattern.removeprefix("re:"), m) for m in quantized_modules), pattern


def test_qwen2_shared_expert_gate_is_exempt_but_shared_expert_quantized():
    plan = build_plan(tiny_config("qwen2_moe"), "nvfp4")
    gate = plan["model.layers.0.mlp.shared_expert_gate.weight"]
    assert (gate.category, gate.quantized, gate.shape) == ("shared_expert_gate", False, (1, 256))
    shared = plan["model.layers.0.mlp.shared_expert.gate_proj.weight"]
    assert (shared.category, shared.quantized) == ("shared_expert", True)
    assert plan["model.layers.0.self_attn.q_proj.bias"].category == "bias"


def test_deepseek_dense_first_layer_and_score_bias():
    plan = build_plan(tiny_config("deepseek_v3"), "nvfp4")
    assert plan["model.layers.0.mlp.gate_proj.weight"].category == "dense_mlp"
    assert plan["model.layers.0.mlp.gate_proj.weight"].quantized
    bias = plan["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert (bias.category, bias.quantized) == ("router", False)
    assert plan["model.layers.1.self_attn.kv_b_proj.weight"].quantized


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_split_matches_save_pretrained(family, tiny_model):
    """The trainer's fused 3-D experts split into exactly the tensors save_pretrained wrote."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model(family)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    plan = build_plan(model, "nvfp4")
    files = _file_tensors(model_dir)
    pieces = {}
    for name, tensor in model.state_dict().items():
        pieces.update(plan.checkpoint_tensors(name, tensor))
    assert set(pieces) == set(files) == set(plan.checkpoint_names())
    for name, piece in pieces.items():
        assert torch.equal(piece, files[name]), name
    # gate first, then up, within one fused tensor
    fused = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    half = fused.shape[1] // 2
    gate_name = EXPERT_GATES[family]
    assert torch.equal(files[gate_name], fused[3, :half])
    assert not torch.equal(files[gate_name], fused[3, half:])


def test_checkpoint_stacks_keep_experts_stacked():
    plan = build_plan(tiny_config("mixtral"), "nvfp4")
    w = torch.arange(4 * 256 * 256, dtype=torch.float32).reshape(4, 256, 256)
    stacks = list(plan.checkpoint_stacks("model.layers.0.mlp.experts.gate_up_proj", w))
    assert [names[0] for names, _ in stacks] == [
        "model.layers.0.block_sparse_moe.experts.0.w1.weight",
        "model.layers.0.block_sparse_moe.experts.0.w3.weight",
    ]
    assert [tuple(s.shape) for _, s in stacks] == [(4, 128, 256), (4, 128, 256)]
    assert torch.equal(stacks[1][1], w[:, 128:])


def test_fused_groups():
    plan = build_plan(tiny_config("qwen3_moe"), "nvfp4")
    attn = "model.layers.1.self_attn."
    assert plan.group_of(attn + "k_proj.weight") == tuple(attn + f"{p}_proj.weight" for p in "qkv")
    e = "model.layers.1.mlp.experts.5."
    assert plan.group_of(e + "up_proj.weight") == (e + "gate_proj.weight", e + "up_proj.weight")
    assert plan.group_of(e + "down_proj.weight") == (e + "down_proj.weight",)
    assert plan.group_of(attn + "o_proj.weight") == (attn + "o_proj.weight",)
    assert len(plan.fused_groups) == 2 * (1 + 8)

    mixtral = build_plan(tiny_config("mixtral"), "nvfp4")
    m = "model.layers.0.block_sparse_moe.experts.2."
    assert mixtral.group_of(m + "w3.weight") == (m + "w1.weight", m + "w3.weight")


def test_deepseek_mla_groups_follow_vllm():
    """No q/k/v in MLA; vLLM fuses q_a_proj with kv_a_proj_with_mqa only when q_lora_rank is set."""
    plan = build_plan(tiny_config("deepseek_v3"), "nvfp4")
    a = "model.layers.1.self_attn."
    assert plan.group_of(a + "kv_a_proj_with_mqa.weight") == (a + "kv_a_proj_with_mqa.weight",)
    assert plan.group_of("model.layers.0.mlp.up_proj.weight") == (
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    )
    s = "model.layers.1.mlp.shared_experts."
    assert plan.group_of(s + "up_proj.weight") == (s + "gate_proj.weight", s + "up_proj.weight")
    lora = build_plan(tiny_config("deepseek_v3", q_lora_rank=64), "nvfp4")
    assert lora.group_of(a + "q_a_proj.weight") == (
        a + "q_a_proj.weight",
        a + "kv_a_proj_with_mqa.weight",
    )
    assert lora[a + "q_a_layernorm.weight"].category == "norm"


def test_dense_qwen3_has_no_router():
    plan = build_plan(tiny_config("qwen3"), "fp8_channel")
    assert not [d for d in plan.decisions.values() if d.category in ("router", "expert")]
    assert plan["model.layers.1.mlp.gate_proj.weight"].category == "dense_mlp"


def test_tied_lm_head_has_no_checkpoint_tensor():
    plan = build_plan(tiny_config("qwen3", tie_word_embeddings=True), "nvfp4")
    assert plan["lm_head.weight"].checkpoint_names == ()
    assert plan["lm_head.weight"].category == "lm_head"
    assert "model.embed_tokens.weight" in plan.checkpoint_names()


def _meta_model(family):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.bfloat16)


def test_unidentifiable_router_raises_naming_candidates():
    model = _meta_model("qwen3_moe")
    with torch.device("meta"):
        model.model.layers[1].mlp.gate = nn.Linear(256, 7, bias=False)  # 7 != 8 experts
    with pytest.raises(
        RouterNotFoundError, match=r"model\.layers\.1\.mlp.*model\.layers\.1\.mlp\.gate \(7, 256\)"
    ):
        build_plan(model, "nvfp4")


def test_two_router_candidates_raise():
    model = _meta_model("mixtral")
    with torch.device("meta"):
        model.model.layers[0].mlp.extra = nn.Linear(256, 4, bias=False)
    with pytest.raises(RouterNotFoundError, match="found 2"):
        build_plan(model, "nvfp4")


def test_unknown_linear_in_moe_block_is_exempt_other():
    model = _meta_model("qwen3_moe")
    with torch.device("meta"):
        model.model.layers[0].mlp.probe = nn.Linear(256, 3, bias=False)
    d = build_plan(model, "nvfp4")["model.layers.0.mlp.probe.weight"]
    assert (d.category, d.quantized) == ("other", False)


def test_unknown_scheme_raises():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        build_plan(tiny_config("qwen3"), "int3")


# --- precision: which quantizable layers get the scheme (`Precision`) ---

def _quantized(plan) -> set[tuple[str, str]]:
    """(layer index, category) of every quantized tensor."""
    return {(d.name.split(".")[2], d.category) for d in plan.quantized()}


def test_the_default_precision_is_the_plan_without_one():
    for family in MOE_FAMILIES + ["qwen3"]:
        cfg = tiny_config(family)
        assert build_plan(cfg, "int8", Precision()).decisions == build_plan(cfg, "int8").decisions


def test_bf16_layers_keep_the_first_and_last_layers_whole():
    plan = build_plan(tiny_config("qwen3_moe", num_hidden_layers=4), "int8", Precision(bf16_layers=1))
    assert _quantized(plan) == {("1", "attention"), ("1", "expert"), ("2", "attention"), ("2", "expert")}
    assert plan["model.layers.3.self_attn.q_proj.weight"].reason == "layer 3 kept BF16 (bf16_layers=1)"
    # vLLM must leave layers 0 and 3 unquantized, and only those: per-layer ignore patterns.
    ignore = plan.ignore_patterns()
    assert r"re:^model\.layers\.0\.self_attn\.q_proj$" in ignore and r"re:^model\.layers\.3\.mlp\.experts\.0\.down_proj$" in ignore
    assert not any(re.match(p[3:], "model.layers.1.self_attn.q_proj") for p in ignore)


def test_quant_targets_choose_the_categories():
    deepseek = tiny_config("deepseek_v3")          # layer 0 dense MLP, layer 1 MoE with a shared expert
    everything = {("0", "attention"), ("0", "dense_mlp"), ("1", "attention"), ("1", "expert"), ("1", "shared_expert")}
    assert _quantized(build_plan(deepseek, "int8", Precision("all_linear"))) == everything
    plan = build_plan(deepseek, "int8", Precision("experts_attention"))
    assert _quantized(plan) == everything - {("0", "dense_mlp")}
    assert plan["model.layers.0.mlp.gate_proj.weight"].reason == "dense_mlp kept BF16 (quant_targets=experts_attention)"
    assert _quantized(build_plan(deepseek, "int8", Precision("experts"))) == {("1", "expert"), ("1", "shared_expert")}
    # Routers, gates, embeddings, lm_head and norms stay exempt whatever the targets.
    exempt = {d.category for d in build_plan(deepseek, "int8", Precision("all_linear")).exempt()}
    assert {"router", "embedding", "lm_head", "norm"} <= exempt


def test_precisions_that_quantize_nothing_or_make_no_sense_are_refused():
    with pytest.raises(ValueError, match="leaves nothing of this 2-layer qwen3_moe quantized"):
        build_plan(tiny_config("qwen3_moe"), "int8", Precision(bf16_layers=1))
    with pytest.raises(ValueError, match="leaves nothing"):
        build_plan(tiny_config("qwen3"), "int8", Precision("experts"))      # a dense model has no experts
    with pytest.raises(ValueError, match="unknown quant targets 'attention'"):
        Precision("attention")
    with pytest.raises(ValueError, match="bf16_layers must be >= 0"):
        Precision(bf16_layers=-1)


# --- overrides: a module kind's own scheme (`Precision.overrides`, rollout.quant_overrides) ---

def test_overrides_give_each_kind_its_scheme_and_the_rest_the_plans():
    deepseek = tiny_config("deepseek_v3")
    precision = Precision(overrides=(("experts", "nvfp4"), ("dense_mlp", "int8")))
    plan = build_plan(deepseek, "fp8_block", precision)
    by_category = {}
    for d in plan.quantized():
        by_category.setdefault(d.category, set()).add(d.scheme)
    assert by_category == {"attention": {"fp8_block"}, "dense_mlp": {"int8"},
                           "expert": {"nvfp4"}, "shared_expert": {"nvfp4"}}
    assert all(d.scheme is None for d in plan.exempt())
    assert plan.schemes() == ["fp8_block", "int8", "nvfp4"]            # the plan's own first
    # Without overrides every quantized decision names the plan's scheme.
    assert {d.scheme for d in build_plan(deepseek, "int8").quantized()} == {"int8"}
    # The same decisions otherwise: overrides change schemes, never what is quantized.
    plain = build_plan(deepseek, "fp8_block")
    assert [(d.name, d.quantized) for d in plan.decisions.values()] == \
           [(d.name, d.quantized) for d in plain.decisions.values()]


def test_override_patterns_match_their_kind_and_nothing_else():
    """The regexes a mixed export's override groups target: every module of their scheme, no
    other module (vLLM matches names before class names, so a stray match would requantize)."""
    plan = build_plan(tiny_config("qwen2_moe"), "fp8_block", Precision(overrides=(("experts", "nvfp4"),)))
    patterns = [p.removeprefix("re:") for p in plan.module_patterns("nvfp4")]
    assert r"^model\.layers\.\d+\.mlp\.experts\.\d+\.gate_proj$" in patterns    # layers and experts folded
    for d in plan.decisions.values():
        for ck in d.checkpoint_names:
            module = ck.rpartition(".")[0]
            matched = any(re.match(p, module) for p in patterns)
            assert matched == (d.scheme == "nvfp4"), (ck, d.category, d.scheme)


@pytest.mark.parametrize("overrides, message", [
    ((("router", "int8"),), "quant_overrides router=int8: router is never quantized"),
    ((("lm_head", "nvfp4"),), "lm_head is never quantized"),
    ((("norm", "int8"),), "norm is never quantized"),
    ((("mlp", "int8"),), "unknown module kind 'mlp'"),
    ((("experts", "int3"),), "unknown scheme 'int3'"),
    ((("experts", "bf16"),), "leave it out of quant_targets"),
])
def test_overrides_that_name_what_is_never_quantized_are_refused(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Precision(overrides=overrides)


def test_an_override_on_a_kind_the_targets_keep_bf16_is_refused():
    with pytest.raises(ValueError, match="quant_targets=experts keeps attention BF16"):
        Precision("experts", overrides=(("attention", "fp8_block"),))
    Precision("experts_attention", overrides=(("attention", "fp8_block"),))     # in the targets: fine
