"""Run under `python -m torch.distributed.run --nproc-per-node 2` by test_save_gather.py.

Every rank builds the FSDP2-sharded policy and takes its state dict while every
torch.distributed.checkpoint gather is recorded (the names it was asked to gather); each rank
writes OUT_DIR/rank<r>.json: those names, the trainable names, and what it got back.
Arguments: MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dcp_state_dict

sys.path.insert(0, str(Path(__file__).parents[1]))
from one_step import policy_config  # noqa: E402

from qerl_rollout.rl.policy import Policy  # noqa: E402


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    gathered: list[str] = []
    real = dcp_state_dict._gather_state_dict

    def recording(state_dict, *args, **kwargs):
        gathered.extend(k for k, v in state_dict.items() if hasattr(v, "full_tensor"))
        return real(state_dict, *args, **kwargs)

    dcp_state_dict._gather_state_dict = recording
    policy = Policy(policy_config(model_dir), distributed=True)
    state = policy.state_dict()
    trainable = sorted(n for n, p in policy.model.named_parameters() if p.requires_grad)
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps({
        "gathered": sorted(set(gathered)), "trainable": trainable, "lora": sorted(state["lora"]),
        "optimizer_state": len(state["optimizer"].get("state", {}))}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
