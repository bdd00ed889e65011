"""`sync/changed_code_fraction`: row fingerprints, and what a push reports against the codes it sent."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from qerl_rollout.rollout.engine import read_manifest
from qerl_rollout.sync.code_delta import FROZEN_AFTER, row_fingerprints
from qerl_rollout.sync.weight_sync import WeightSync
from qerl_rollout.wire.stream import is_code_tensor

sys.path.insert(0, str(Path(__file__).parent))
from recording import RecordingReceiver  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.uint8])
def test_every_single_byte_change_marks_its_row_and_only_it(dtype):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (7, 21), generator=g, dtype=torch.uint8).view(dtype)   # 21: padded
    before = row_fingerprints(codes)
    assert torch.equal(before, row_fingerprints(codes.clone()))
    for col in range(21):
        changed = codes.clone()
        changed.view(torch.uint8)[4, col] ^= 1 << (col % 8)
        assert ((row_fingerprints(changed) != before).nonzero().flatten().tolist()) == [4], col


class _Receiver(RecordingReceiver):
    """Records each push's tensors anew (the base class keeps one push)."""

    def begin_update(self, version, digest=False):
        self.tensors = {}


def _codes(tensors: dict) -> dict:
    return {n: t for n, t in tensors.items() if is_code_tensor(n, t)}


def _changed_rows(old: dict, new: dict) -> tuple[int, int]:
    """Rows of the code tensors in `new` whose bytes differ from `old`'s, counted by hand."""
    changed = total = 0
    for name, t in new.items():
        a, b = old[name].view(torch.uint8).reshape(t.shape[0], -1), t.view(torch.uint8).reshape(t.shape[0], -1)
        changed += int((a != b).any(dim=1).sum())
        total += t.shape[0]
    return changed, total


@pytest.mark.parametrize("scheme", ["int8", "nvfp4"])
def test_a_push_reports_the_rows_of_codes_it_changed(tiny_qwen3_moe, scheme, caplog):
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

    # A real update of one layer's q_proj: the fraction is the rows that changed, by hand.
    with torch.no_grad():
        lora_b["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].normal_(std=0.05)
    report = sync.push(policy)
    sent = _codes(receiver.tensors)
    changed, total = _changed_rows(last, sent)
    assert 0 < changed < total
    assert report.changed_code_fraction == {"all": changed / total, "attention": changed / total}
