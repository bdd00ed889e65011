"""Run under `python -m torch.distributed.run --nproc-per-node N` by test_sharded_checkpoint.py.

`save MODEL_DIR OUT`: every rank builds the FSDP2-sharded policy while its reads of the model
checkpoint are counted (rank 0 writes the loaded full model state to OUT/model.pt and each rank
its buffers to OUT/buffers-rank<r>.pt), takes one GRPO step (so the
AdamW moments are not zero) and writes `Policy.save_state(OUT/ckpt)` while every gather of
torch.distributed.checkpoint is recorded; then (after the save) the full LoRA tensors and
AdamW state are gathered for the comparison and rank 0 writes them to OUT/reference.pt.
`load MODEL_DIR OUT`: every rank builds a fresh sharded policy, loads OUT/ckpt while counting
the bytes its reads ask for, and rank 0 writes the loaded full state to OUT/loaded-<N>.pt.
Each rank writes OUT/<mode>-<N>-rank<r>.json: what it gathered and read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dcp_state_dict
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parents[1]))
from one_step import GRPO, batch, policy_config  # noqa: E402

from qerl_rollout.rl.mismatch import MismatchConfig  # noqa: E402
from qerl_rollout.rl.policy import Policy  # noqa: E402
from qerl_rollout.workers.trainer import row_blocks  # noqa: E402


def full_state(policy: Policy) -> dict:
    """LoRA tensors, AdamW state (full tensors) and schedule, on rank 0 (a collective; the
    other ranks get empty ones)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optim = get_optimizer_state_dict(policy.model, policy.optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"lora": policy.lora_tensors(), "optim_state": optim.get("state", {}),
            "lr": [g["lr"] for g in optim.get("param_groups", [])],
            "scheduler": policy.scheduler.state_dict(), "step": policy.step}


def main(mode: str, model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world, out = dist.get_rank(), dist.get_world_size(), Path(out)
    gathered: list[str] = []
    real_gather = dcp_state_dict._gather_state_dict

    def recording(state_dict, *args, **kwargs):
        gathered.extend(k for k, v in state_dict.items() if hasattr(v, "full_tensor"))
        return real_gather(state_dict, *args, **kwargs)

    read_bytes = [0]
    real_read = FileSystemReader.read_data

    def counting(self, plan, planner):
        read_bytes[0] += sum(self.storage_data[item.storage_index].length for item in plan.items)
        return real_read(self, plan, planner)

    dcp_state_dict._gather_state_dict = recording
    FileSystemReader.read_data = counting
    reads = [0]
    real_from_pretrained = AutoModelForCausalLM.from_pretrained.__func__

    def counting_reads(cls, *args, **kwargs):
        reads[0] += 1
        return real_from_pretrained(cls, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(counting_reads)
    policy = Policy(policy_config(model_dir), GRPO, MismatchConfig(), distributed=True)
    if mode == "save":
        torch.save(dict(policy.model.named_buffers()), out / f"buffers-rank{rank}.pt")
        model = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(model, out / "model.pt")
        gathered.clear()
        tokens, advantages, logp = batch()
        a, b = row_blocks(len(tokens), world)[rank]
        policy.train_step(tokens.rows(a, b), advantages[a:b], logp[a:b])
        policy.save_state(out / "ckpt")
        saved_gathers = sorted(set(gathered))
        reference = full_state(policy)
        if rank == 0:
            torch.save(reference, out / "reference.pt")
    else:
        policy.load_state(out / "ckpt")
        saved_gathers = sorted(set(gathered))
        loaded = full_state(policy)
        if rank == 0:
            torch.save(loaded, out / f"loaded-{world}.pt")
    (out / f"{mode}-{world}-rank{rank}.json").write_text(json.dumps(
        {"gathered": saved_gathers, "read_bytes": read_bytes[0], "model_reads": reads[0]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
