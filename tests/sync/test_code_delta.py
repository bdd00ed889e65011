"""`sync/changed_code_fraction`: what a push reports against the codes it sent (block fingerprints:
tests/sync/test_delta_push.py)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from qerl_rollout.rollout.engine import read_manifest
from qerl_rollout.sync.code_delta import FROZEN_AFTER
from qerl_rollout.sync.weight_sync import WeightSync
from qerl_rollout.wire.delta import BLOCK_BYTES
from qerl_rollout.wire.stream import is_code_tensor

sys.path.insert(0, str(Path(__file__).parent))
from recording import RecordingReceiver  # noqa: E402


class _Receiver(RecordingReceiver):
    """Records each push's tensors anew (the base class keeps one push)."""

    def begin_update(self, version, digest=False):
        self.tensors = {}


def _codes(tensors: dict) -> dict:
    return {n: t for n, t in tensors.items() if is_code_tensor(n, t)}


def _changed_blocks(old: dict, new: dict) -> tuple[int, int]:
    """BLOCK_BYTES blocks of the code tensors in `new` whose bytes differ from `old`'s, by hand."""
    changed = total = 0
    for name, t in new.items():
        a, b = old[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        for start in range(0, b.numel(), BLOCK_BYTES):
            changed += int(not torch.equal(a[start:start + BLOCK_BYTES], b[start:start + BLOCK_BYTES]))
            total += 1
    return changed, total


@pytest.mark.parametrize("scheme", ["int8", "nvfp4"])
def test_a_push_reports_the_blocks_of_codes_it_changed(tiny_qwen3_moe, scheme, caplog):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_moe), dtype=torch.bfloat16)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    lora_b = {n: p for n, p in policy.named_parameters() if "lora_B" in n}
    receiver = _Receiver(scheme, read_manifest(tiny_qwen3_moe))
    sync = WeightSync(receiver)
    assert sync.push(policy).changed_code_fraction == {}          # nothing to compare with yet
    last = _codes(receiver.tensors)

    # Updates below BF16's resolution of the merged weights: the codes cannot move.
    caplog.set_level(logging.WARNING, logger="qerl_rollout.sync.code_delta")
    for step in range(FROZEN_AFTER):
        with torch.no_grad():
            lora_b["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].add_(1e-30)
        report = sync.push(policy)
        assert not report.full and report.changed_code_fraction == {"all": 0.0, "attention": 0.0}
        assert ("policy is frozen" in caplog.text) == (step == FROZEN_AFTER - 1)

    # A real update of one layer's q_proj: the fraction is the blocks that changed, by hand.
    with torch.no_grad():
        lora_b["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].normal_(std=0.05)
    report = sync.push(policy)
    sent = _codes(receiver.tensors)
    changed, total = _changed_blocks(last, sent)
    assert 0 < changed < total
    assert report.changed_code_fraction == {"all": changed / total, "attention": changed / total}
