"""Sharded loads and checkpoints of the FSDP2 policy (`rl.fsdp.load_sharded`,
`Policy.save_state` / `load_state`, torch.distributed.checkpoint).

Two gloo ranks (FSDP2) build the policy, take one GRPO step and save; the state is then
loaded by 3 ranks, by 2 ranks and by one process. What must hold:
- only rank 0 reads the model checkpoint (the other builds on the meta device), and the
  sharded model it ends up with is the single-process one exactly: every weight, every seeded
  LoRA factor, and the buffers no state dict holds (rotary `inv_freq`) on both ranks;
- the save gathers nothing (before, every rank gathered the full optimizer state and rank 0
  the LoRA tensors, and all of it travelled to the driver), and each rank wrote its own file;
- every load equals the saved state exactly (LoRA tensors, AdamW moments and step counts,
  learning rate, scheduler, step): DCP places each saved chunk by its global offsets, so
  N -> M resharding moves bytes and rounds nothing;
- loading with the same 2 ranks, each rank reads exactly the bytes of its own shards plus the
  replicated entries (AdamW step counts, param groups, schedule), not the whole state;
- a policy of another shape (LoRA rank 4 instead of 8) is refused, naming the tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from one_step import GRPO, policy_config

from qerl_rollout.rl.mismatch import MismatchConfig
from qerl_rollout.rl.policy import Policy

SCRIPT = Path(__file__).parent / "sharded_checkpoint.py"


def _ranks(mode: str, n: int, model_dir, out: Path, port: int, env: dict) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(port), str(SCRIPT), mode, str(model_dir), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"{mode}-{n}-rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def saved(tiny_qwen3_moe, tmp_path_factory, launch_env):
    out = tmp_path_factory.mktemp("sharded_checkpoint")
    ranks = _ranks("save", 2, tiny_qwen3_moe, out, 29571, launch_env())
    return out, ranks, torch.load(out / "reference.pt", weights_only=False)


def test_only_rank_0_reads_the_model_and_every_rank_holds_the_single_process_model(saved, tiny_qwen3_moe):
    out, ranks, _ = saved
    assert [r["model_reads"] for r in ranks] == [1, 0]
    single = Policy(policy_config(tiny_qwen3_moe), GRPO, MismatchConfig()).model
    sharded = torch.load(out / "model.pt", weights_only=False)
    assert sharded.keys() == single.state_dict().keys()
    for name, tensor in single.state_dict().items():
        assert torch.equal(sharded[name], tensor), name
    buffers = dict(single.named_buffers())
    assert any("inv_freq" in name for name in buffers)
    for rank in (0, 1):
        got = torch.load(out / f"buffers-rank{rank}.pt", weights_only=False)
        assert got.keys() == buffers.keys() and all(torch.equal(got[k], buffers[k]) for k in buffers), rank


def _assert_equal(loaded: dict, reference: dict) -> None:
    assert loaded["lora"].keys() == reference["lora"].keys()
    for name, tensor in reference["lora"].items():
        assert torch.equal(loaded["lora"][name], tensor), name
    assert loaded["optim_state"].keys() == reference["optim_state"].keys()
    for name, state in reference["optim_state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded["optim_state"][name][key], state[key]), (name, key)
    assert loaded["lr"] == reference["lr"]
    assert loaded["scheduler"] == reference["scheduler"] and loaded["step"] == reference["step"] == 1


def test_the_save_gathers_nothing_and_each_rank_writes_its_shard(saved):
    out, ranks, reference = saved
    assert [r["gathered"] for r in ranks] == [[], []]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    moved = [n for n, s in reference["optim_state"].items() if s["exp_avg"].abs().max() > 0]
    assert moved, "the step left every AdamW moment at zero: nothing to compare"


@pytest.mark.parametrize("world, port", [(3, 29572), (2, 29573)])
def test_a_sharded_state_loads_into_any_number_of_ranks_exactly(saved, tiny_qwen3_moe, world, port, launch_env):
    out, _, reference = saved
    ranks = _ranks("load", world, tiny_qwen3_moe, out, port, launch_env())
    assert all(r["gathered"] == [] for r in ranks)
    _assert_equal(torch.load(out / f"loaded-{world}.pt", weights_only=False), reference)
    if world == 2:
        own, replicated = _bytes_by_file(out / "ckpt")
        for r, rank in enumerate(ranks):
            assert rank["read_bytes"] == own[f"__{r}_0.distcp"] + replicated
        assert replicated < min(own.values())


def _bytes_by_file(ckpt: Path) -> tuple[dict[str, int], int]:
    """The sharded entries' bytes in each rank's file (LoRA tensors and AdamW moments), and
    the replicated entries' bytes (AdamW step counts, param groups, schedule: stored once)."""
    from torch.distributed.checkpoint import FileSystemReader

    own, replicated = {}, 0
    for index, info in FileSystemReader(str(ckpt)).read_metadata().storage_data.items():
        if index.fqn.startswith("model.") or index.fqn.endswith(("exp_avg", "exp_avg_sq")):
            own[info.relative_path] = own.get(info.relative_path, 0) + info.length
        else:
            replicated += info.length
    return own, replicated


def test_one_process_loads_a_two_rank_state_exactly(saved, tiny_qwen3_moe):
    out, _, reference = saved
    policy = Policy(policy_config(tiny_qwen3_moe), GRPO, MismatchConfig())
    policy.load_state(out / "ckpt")
    optim = policy.optimizer.state_dict()
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    loaded = {"lora": policy.lora_tensors(), "lr": [g["lr"] for g in optim["param_groups"]],
              "optim_state": {names[i]: s for i, s in optim["state"].items()},
              "scheduler": policy.scheduler.state_dict(), "step": policy.step}
    _assert_equal(loaded, reference)


def test_a_policy_of_another_shape_is_refused(saved, tiny_qwen3_moe):
    out, _, _ = saved
    from dataclasses import replace

    policy = Policy(replace(policy_config(tiny_qwen3_moe), lora_rank=4), GRPO, MismatchConfig())
    with pytest.raises(ValueError, match=r"the checkpoint's .*lora_A.* is \(8, .*another lora_rank"):
        policy.load_state(out / "ckpt")
