"""A sharded trainer's checkpoint never gathers the frozen base, and only rank 0 holds it.

Two gloo ranks (FSDP2) take `Policy.state_dict()` while every gather of
torch.distributed.checkpoint is recorded: the names gathered must be exactly the trainable
(LoRA) ones, not one frozen BF16 weight (before, `full_state_dict=True` gathered the whole
model on every rank: 61 GB per GPU for Qwen3-30B-A3B, `python -m qerl_rollout.plan`), and
rank 0 gets every LoRA tensor and the optimizer state while rank 1 gets none (`cpu_offload`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ranks(tiny_qwen3_moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("save_gather")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29565",
           str(Path(__file__).parent / "save_gather.py"), str(tiny_qwen3_moe), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_only_trainable_tensors_are_gathered(ranks):
    for rank in ranks:
        assert rank["gathered"] and set(rank["gathered"]) <= set(rank["trainable"])
        assert all("lora_" in name for name in rank["gathered"])


def test_rank_0_holds_the_checkpoint_and_rank_1_nothing(ranks):
    zero, one = ranks
    assert zero["lora"] == zero["trainable"]
    assert zero["optimizer_state"] == len(zero["trainable"])   # DCP initialises AdamW's state per parameter
    assert one["lora"] == [] and one["optimizer_state"] == 0
