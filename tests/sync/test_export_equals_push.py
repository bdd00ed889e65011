"""One implementation: an exported checkpoint and a full push of the same weights are the same bytes.

A kernel-mode engine starts from the export (`quant.export`) and is then fed pushes built by the
sync (`wire.stream`); if the two paths quantized differently (another fused-group amax, another
rounding), version 0 and version 1 of the same weights would differ. Here a receiver that keeps
what it is sent takes a full push of the unmodified checkpoint, and every tensor must equal the
exported one bit for bit, with the same names and dtypes, for every scheme and MoE family. One
kind of exception is allowed: an exempt tensor the trainer holds in another dtype than the
checkpoint (transformers keeps DeepSeek's `e_score_correction_bias` in fp32, the checkpoint in
bf16) travels in the trainer's dtype, and then must convert losslessly to the exported value.
"""

from __future__ import annotations

import pytest
import torch
from recording import RecordingReceiver
from transformers import AutoModelForCausalLM

from qerl_rollout.quant.export import export_checkpoint
from qerl_rollout.rollout.engine import checkpoint_stream, read_manifest
from qerl_rollout.sync.weight_sync import WeightSync


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _same_values_other_dtype(name: str, pushed: torch.Tensor, exported: torch.Tensor) -> bool:
    lossless = torch.equal(pushed.to(exported.dtype).to(pushed.dtype), pushed)
    return (name.endswith("e_score_correction_bias") and pushed.dtype != exported.dtype and lossless
            and torch.equal(pushed.to(exported.dtype), exported))


@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_channel", "int8", "nvfp4"])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_full_push_equals_the_export(tiny_model, tmp_path, family, scheme):
    model_dir = tiny_model(family)
    out = tmp_path / "export"
    export_checkpoint(model_dir, out, scheme, progress=False)
    exported = dict(checkpoint_stream(out))
    receiver = RecordingReceiver(scheme, read_manifest(out))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    report = WeightSync(receiver).push(model)
    assert report.full and receiver.version == 1
    assert sorted(receiver.tensors) == sorted(exported)
    differ = [n for n in exported if not _same(receiver.tensors[n], exported[n])
              and not _same_values_other_dtype(n, receiver.tensors[n], exported[n])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_the_comparison_sees_one_flipped_bit(tiny_model, tmp_path):
    out = tmp_path / "export"
    export_checkpoint(tiny_model("qwen3_moe"), out, "int8", progress=False)
    a = dict(checkpoint_stream(out))["model.layers.0.self_attn.q_proj.weight"]
    b = a.clone()
    b.view(torch.uint8).view(-1)[11] ^= 1
    assert _same(a, a.clone()) and not _same(a, b)
