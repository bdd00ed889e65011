"""A trainer rank's device round trip (colocated placement) keeps delta pushes small.

Moving a policy off its GPU and back gives every tensor new storage, so its fingerprint
(`sync.merge.fingerprint`: identity, data pointer, version) changes although no value did,
and before `WeightSync.rebase` the next push re-sent everything. The GPU round trip cannot
run here: the move stands in as what it does to storage (every parameter gets a fresh copy of
its values, `param.data = param.data.clone()`). A real `PolicyTrainer` (the trainer wrapper
of every placement; each Ray trainer rank is one) moves, one attention LoRA factor changes, and the next push must send only that layer's
attention unit; the same move without the worker's rebase sends everything (the bug).
"""

from __future__ import annotations

import pytest
import torch
from one_step import policy_config
from recording import RecordingReceiver

from qerl_rollout.placement.trainer import PolicyTrainer
from qerl_rollout.quant.export import export_checkpoint
from qerl_rollout.rl.policy import Policy
from qerl_rollout.rollout.engine import read_manifest
from qerl_rollout.wire.stream import unit_of


class PushRecorder(RecordingReceiver):
    """A recording receiver that keeps the names of each push apart."""

    def begin_update(self, version, digest=False):
        self.tensors = {}


def _new_storage(policy: Policy, device) -> None:
    """What a GPU round trip does to a CPU test's tensors: same values, new storage."""
    with torch.no_grad():
        for p in policy.model.parameters():
            p.data = p.data.clone()


@pytest.fixture()
def worker(tiny_qwen3_moe, tmp_path, monkeypatch):
    export_checkpoint(tiny_qwen3_moe, tmp_path / "fp8", "fp8_block", progress=False)
    w = PolicyTrainer(Policy(policy_config(tiny_qwen3_moe)))
    receiver = PushRecorder("fp8_block", read_manifest(tmp_path / "fp8"))
    w.connect("rollout", receiver, bucket_bytes=1 << 20)
    monkeypatch.setattr(Policy, "to_device", _new_storage)
    w.syncs["rollout"].push(w.policy.model)
    assert len(receiver.tensors) > 100            # the first push is full
    return w, receiver


def _step_one_lora(policy: Policy) -> None:
    name, p = next((n, p) for n, p in policy.model.named_parameters()
                   if "layers.1.self_attn.q_proj.lora_B" in n)
    with torch.no_grad():
        p.add_(0.01)


def test_a_delta_push_after_a_round_trip_sends_only_what_changed(worker):
    w, receiver = worker
    w.to_device("cpu")
    w.to_device("cuda")
    _step_one_lora(w.policy)
    report = w.syncs["rollout"].push(w.policy.model)
    assert not report.full
    assert {unit_of(n) for n in receiver.tensors} == {"model.layers.1.self_attn"}


def test_without_the_rebase_a_round_trip_makes_the_push_full(worker):
    w, receiver = worker
    _new_storage(w.policy, "cpu")
    _step_one_lora(w.policy)
    w.syncs["rollout"].push(w.policy.model)
    assert len(receiver.tensors) > 100
