"""LoRA merge on the fly: exact fp32 formula, plain names, the trainer untouched, fingerprints."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from qerl_rollout.sync.merge import fingerprint, merged_named_tensors, plain_name

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _lora(model_dir, dtype=torch.bfloat16, experts=True, seed=0):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    names = [n for n, _ in model.named_parameters()]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN,
                     target_parameters=EXPERTS if experts else None)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:   # peft initialises B to zero; make the adapters do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model, names


def test_plain_name_strips_peft_wrapping():
    assert plain_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert plain_name("base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.down_proj") == \
        "model.layers.0.mlp.experts.down_proj"


def test_names_and_order_are_the_plain_models(tiny_qwen3_moe):
    peft_model, names = _lora(tiny_qwen3_moe)
    assert [n for n, _ in merged_named_tensors(peft_model)] == names


def test_linear_merge_is_fp32_sum_rounded_once(tiny_qwen3_moe):
    peft_model, _ = _lora(tiny_qwen3_moe, experts=False)
    merged = dict(merged_named_tensors(peft_model))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.float()
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    expected = (w + layer.scaling["default"] * (b @ a)).to(torch.bfloat16)
    got = merged["model.layers.0.self_attn.q_proj.weight"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    # The adapter really changed the weight (so the equality above is not vacuous).
    assert not torch.equal(got, layer.base_layer.weight)


def test_expert_merge_matches_peft_merge_and_unload_in_fp32(tiny_qwen3_moe):
    # In fp32 peft's own merge is the reference; the only difference is summation order
    # inside the einsum, so agreement is to fp32 rounding (|w| ~ 0.1: 1e-6 absolute).
    peft_model, _ = _lora(tiny_qwen3_moe, dtype=torch.float32)
    ours = {n: t.clone() for n, t in merged_named_tensors(peft_model)}
    reference = dict(peft_model.merge_and_unload().named_parameters())
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.1.self_attn.v_proj.weight"):
        assert ours[name].shape == reference[name].shape
        torch.testing.assert_close(ours[name], reference[name].detach(), rtol=0, atol=1e-6)
        assert (ours[name] - reference[name]).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_never_writes_the_trainer_weights(tiny_qwen3_moe, dtype):
    peft_model, _ = _lora(tiny_qwen3_moe, dtype=dtype)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    versions = {n: p._version for n, p in peft_model.named_parameters()}
    list(merged_named_tensors(peft_model))
    for n, p in peft_model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p._version == versions[n], n


def test_fingerprint_sees_an_optimizer_step_on_attention_lora_only(tiny_qwen3_moe):
    peft_model, _ = _lora(tiny_qwen3_moe, experts=False)
    fp0 = fingerprint(peft_model)
    assert fingerprint(peft_model) == fp0
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    fp1 = fingerprint(peft_model)
    changed = {n for n in fp0 if fp0[n] != fp1[n]}
    attn = {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ATTN}
    assert changed == attn


def test_disabled_adapters_merge_to_the_base(tiny_qwen3_moe):
    peft_model, _ = _lora(tiny_qwen3_moe)
    with peft_model.disable_adapter():
        merged = dict(merged_named_tensors(peft_model))
    base = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base)


def test_merged_adapters_are_refused(tiny_qwen3_moe):
    peft_model, _ = _lora(tiny_qwen3_moe, experts=False)
    peft_model.base_model.model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged adapters"):
        list(merged_named_tensors(peft_model))


def test_fingerprint_sees_data_assignment_data_writes_and_load_state_dict(tiny_qwen3_moe):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_moe), dtype=torch.bfloat16)
    fp0 = fingerprint(model)
    norm = model.model.layers[0].input_layernorm.weight
    norm.data = norm.data.clone() * 2                                   # storage swap
    model.model.layers[1].self_attn.k_norm.weight.data.mul_(3)          # write through .data
    router = "model.layers.1.mlp.gate.weight"
    model.load_state_dict({router: torch.zeros_like(model.state_dict()[router])}, strict=False)
    fp1 = fingerprint(model)
    assert {n for n in fp0 if fp0[n] != fp1[n]} == {
        "model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.k_norm.weight", router}


def test_embedding_lora_is_refused_not_dropped(tiny_qwen3_moe):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_moe), dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(NotImplementedError, match="embeddings"):
        list(merged_named_tensors(peft_model))
