"""Units, encoding/decoding of the wire payload, and bucketing (pure, no engine)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qerl_rollout.quant import quantize
from qerl_rollout.quant.plan import Precision, build_plan
from qerl_rollout.wire.bucket import buckets, nbytes
from qerl_rollout.wire.stream import (
    Piece,
    Unit,
    all_finite,
    decode_payload,
    encode_unit,
    pieces,
    qdq_named_tensors,
    unit_of,
    units,
)


@pytest.mark.parametrize("name, unit", [
    ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn"),
    ("model.layers.3.self_attn.q_norm.weight", "model.layers.3.self_attn"),
    ("model.layers.3.mlp.experts.7.up_proj.weight", "model.layers.3.mlp.experts"),
    ("model.layers.3.block_sparse_moe.experts.0.w1.weight", "model.layers.3.block_sparse_moe.experts"),
    ("model.layers.3.mlp.gate.weight", "model.layers.3.mlp"),
    ("model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.3.mlp"),
    ("model.layers.3.mlp.shared_expert.down_proj.weight", "model.layers.3.mlp.shared_expert"),
    ("model.layers.3.input_layernorm.weight", "model.layers.3"),
    ("model.embed_tokens.weight", "model"),
    ("lm_head.weight", ""),
])
def test_unit_of(name, unit):
    assert unit_of(name) == unit


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_moe):
    return AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_moe), dtype=torch.bfloat16)


def _units(model, scheme):
    plan = build_plan(model.config, scheme)
    return plan, list(units(pieces(plan, model.state_dict().items())))


def test_units_are_whole_and_never_repeat(qwen3):
    _, us = _units(qwen3, "fp8_block")
    keys = [u.key for u in us]
    # Inside decoder layers a unit arrives once; the top level ("model") comes twice, as the
    # embedding first and the final norm last: two separate engine layers, which is allowed.
    layer_keys = [k for k in keys if ".layers." in k]
    assert len(layer_keys) == len(set(layer_keys)), keys
    top = [[n for p in u.pieces for n in p.names] for u in us if u.key == "model"]
    assert top == [["model.embed_tokens.weight"], ["model.norm.weight"]]
    attn = next(u for u in us if u.key == "model.layers.0.self_attn")
    names = [n for p in attn.pieces for n in p.names]
    assert sorted(names) == sorted(f"model.layers.0.self_attn.{p}.weight"
                                   for p in ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"])
    experts = next(u for u in us if u.key == "model.layers.0.mlp.experts")
    assert sum(len(p.names) for p in experts.pieces) == 8 * 3   # gate, up, down of 8 experts


@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_channel", "int8", "nvfp4"])
def test_decode_of_encode_is_the_qdq_of_every_quantized_tensor(qwen3, scheme):
    plan, us = _units(qwen3, scheme)
    sd = qwen3.state_dict()
    qdq = dict(qdq_named_tensors(plan, scheme, sd.items()))
    shapes, expected = _shapes(plan, sd), {}
    for n in sd:
        for names, stack in plan.checkpoint_stacks(n, qdq[n]):   # the same cut of the QDQ tensor
            expected.update(zip(names, stack.unbind(0) if len(names) > 1 else [stack]))
    n_quantized = 0
    for unit in us:
        wire = encode_unit(unit, plan, scheme)
        decoded = dict(decode_payload(wire, plan, shapes))
        for piece in unit.pieces:
            quantized = plan.for_checkpoint(piece.names[0]).quantized
            tensors = piece.tensor.unbind(0) if piece.stacked else [piece.tensor]
            for name, t in zip(piece.names, tensors):
                got = decoded[name]
                assert got.dtype == torch.bfloat16
                assert torch.equal(got, expected[name]), name
                if quantized:
                    n_quantized += 1
                    assert not torch.equal(got, t), name            # really quantized
                else:
                    assert torch.equal(got, t), name                # exempt: untouched
    assert n_quantized == 2 * (4 + 8 * 3)   # per layer: q, k, v, o and 8 experts x 3
    # The QDQ reference itself, checked against the quantizer on a tensor outside any group.
    o = sd["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(qdq["model.layers.0.self_attn.o_proj.weight"], quantize(o, scheme).dequantize())
    # q/k/v share a global scale under nvfp4 (the group's largest amax), so the member with
    # the smallest amax quantizes differently alone than inside its group.
    qkv = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    smallest = min(qkv, key=lambda n: sd[n].abs().max().item())
    same = torch.equal(qdq[smallest], quantize(sd[smallest], scheme).dequantize())
    assert same == (scheme != "nvfp4")


def test_nvfp4_fused_groups_share_one_global_scale(qwen3):
    plan, us = _units(qwen3, "nvfp4")
    wire = dict(w for u in us for w in encode_unit(u, plan, "nvfp4"))
    prefix = "model.layers.1.self_attn."
    gs = [wire[prefix + f"{p}.weight_global_scale"] for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(gs[0], gs[1]) and torch.equal(gs[1], gs[2])
    sd = qwen3.state_dict()
    amax = max(sd[prefix + f"{p}.weight"].abs().max() for p in ("q_proj", "k_proj", "v_proj"))
    # The smaller of the three scales: computed from the largest amax (448*6/amax in bf16).
    expected = (torch.tensor(448 * 6, dtype=torch.bfloat16) / amax.to(torch.bfloat16)).float()
    assert torch.equal(gs[0].reshape(()), expected.reshape(()))
    # o_proj is alone: its own scale.
    o = sd[prefix + "o_proj.weight"]
    assert torch.equal(wire[prefix + "o_proj.weight_global_scale"].reshape(()),
                       (torch.tensor(2688.0, dtype=torch.bfloat16) / o.abs().max()).float().reshape(()))
    # gate/up of each expert share one; different experts generally differ.
    e = "model.layers.0.mlp.experts."
    for i in range(8):
        assert torch.equal(wire[e + f"{i}.gate_proj.weight_global_scale"], wire[e + f"{i}.up_proj.weight_global_scale"])
    assert len({wire[e + f"{i}.gate_proj.weight_global_scale"].item() for i in range(8)}) > 1


def _shapes(plan, sd):
    out = {}
    for n, t in sd.items():
        for names, stack in plan.checkpoint_stacks(n, t):
            out.update((ck, tuple(stack.shape[1:]) if len(names) > 1 else tuple(stack.shape)) for ck in names)
    return out


def test_a_mixed_plan_sends_and_decodes_each_kind_as_its_own_scheme_would(qwen3):
    """`quant_overrides`: experts nvfp4 + attention fp8_block. Each unit's wire bytes and its
    decoded BF16 values are those of the single-scheme plan of its kind's scheme; a compressed
    layer the engine's plan keeps BF16 is refused, not decoded in some scheme."""
    sd = qwen3.state_dict()
    mixed = build_plan(qwen3.config, "fp8_block", Precision(overrides=(("experts", "nvfp4"),)))
    single = {s: build_plan(qwen3.config, s) for s in ("fp8_block", "nvfp4")}
    shapes = _shapes(mixed, sd)
    seen = set()
    for unit in units(pieces(mixed, sd.items())):
        schemes = {mixed.for_checkpoint(p.names[0]).scheme for p in unit.pieces} - {None}
        assert len(schemes) <= 1, unit.key                # a unit is one kind
        ref = single[schemes.pop() if schemes else "fp8_block"]
        seen.add(ref.scheme)
        wire, ref_wire = encode_unit(unit, mixed, "fp8_block"), encode_unit(unit, ref, ref.scheme)
        assert [n for n, _ in wire] == [n for n, _ in ref_wire]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(wire, ref_wire)), unit.key
        decoded, ref_decoded = decode_payload(wire, mixed, shapes), decode_payload(ref_wire, ref, shapes)
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(decoded, ref_decoded)), unit.key
    assert seen == {"fp8_block", "nvfp4"}
    attention = next(u for u in units(pieces(mixed, sd.items())) if u.key == "model.layers.0.self_attn")
    experts_only = build_plan(qwen3.config, "fp8_block", Precision("experts"))
    with pytest.raises(ValueError, match="q_proj.weight arrived compressed but the engine's plan keeps it BF16"):
        decode_payload(encode_unit(attention, mixed, "fp8_block"), experts_only, shapes)


def test_nan_in_a_quantized_tensor_names_the_trainer_tensor(qwen3):
    plan = build_plan(qwen3.config, "fp8_block")
    w = qwen3.state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()
    w[3, 5] = float("nan")
    unit = Unit("model.layers.0.self_attn", [Piece(("model.layers.0.self_attn.q_proj.weight",), w, "trainer.q")])
    with pytest.raises(ValueError, match="trainer.q"):
        encode_unit(unit, plan, "fp8_block")


def test_buckets_close_at_unit_boundaries_and_oversized_units_travel_alone():
    def unit(n_bytes, tag):
        return [(f"{tag}.weight", torch.zeros(n_bytes, dtype=torch.uint8))]

    sizes = [40, 40, 30, 200, 10]
    out = list(buckets((unit(s, f"u{i}") for i, s in enumerate(sizes)), max_bytes=100))
    assert [[n for n, _ in b] for b in out] == [["u0.weight", "u1.weight"], ["u2.weight"],
                                              ["u3.weight"], ["u4.weight"]]
    assert [nbytes(b) for b in out] == [80, 30, 200, 10]
    with pytest.raises(ValueError):
        list(buckets([], 0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_catches_nan_and_inf_anywhere(bad):
    t = torch.randn(1000, dtype=torch.bfloat16)
    assert all_finite(t) and all_finite(torch.empty(0))
    for i in (0, 517, 999):
        u = t.clone()
        u[i] = bad
        assert not all_finite(u)
    big = torch.full((4,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    assert all_finite(big)   # the largest finite values are not mistaken for overflow
