"""Helpers shared by the sharded-sync test and its torchrun script."""

from __future__ import annotations

import torch

from qerl_rollout.quant.plan import Precision
from qerl_rollout.rl.policy import PolicyConfig


class RecordingReceiver:
    """A `WeightReceiver` that keeps every tensor it is sent (what a kernel engine would load)."""

    mode = "kernel"
    precision = Precision()

    def __init__(self, scheme: str, manifest: dict):
        self.scheme, self._manifest, self.version = scheme, manifest, 0
        self.tensors: dict[str, torch.Tensor] = {}

    def manifest(self):
        return self._manifest

    def begin_update(self, version):
        pass

    def load(self, named_tensors):
        for name, t in named_tensors:
            assert name not in self.tensors, f"{name} sent twice in one push"
            self.tensors[name] = t.detach().clone()

    def commit(self, version):
        self.version = version

    def abort(self, reason):
        raise AssertionError(reason)


def policy_config(model_dir) -> PolicyConfig:
    """LoRA on attention, lm_head and the fused experts: every merge path the sync has."""
    return PolicyConfig(model_path=str(model_dir), device="cpu", lora_rank=4, lora_alpha=8,
                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "lm_head"),
                        target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
