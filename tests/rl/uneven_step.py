"""Run under `python -m torch.distributed.run --nproc-per-node 3` by test_uneven_ranks.py.

Every rank builds the FSDP2-sharded policy, takes its row block of `one_step.batch(ROWS)`
(blocks differ by one row) and runs one train step replaying `one_step.rule_routes` (R3), once
per micro-batch size; rank 0 saves
the combined metrics and the LoRA tensors after each step to OUT_DIR/mb<size>.pt.
Arguments: MODEL_DIR OUT_DIR ROWS SIZE [SIZE ...]
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from one_step import GRPO, batch, policy_config, policy_routes  # noqa: E402

from qerl_rollout.dist import full_tensor  # noqa: E402
from qerl_rollout.rl.mismatch import MismatchConfig  # noqa: E402
from qerl_rollout.rl.policy import Policy, combine_rank_metrics  # noqa: E402
from qerl_rollout.workers.trainer import row_blocks  # noqa: E402


def main(model_dir: str, out_dir: str, rows: str, *sizes: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens, advantages, logp_rollout = batch(int(rows))
    a, b = row_blocks(int(rows), world)[rank]
    for size in map(int, sizes):
        cfg = replace(policy_config(model_dir, size), routing_replay="r3")
        policy = Policy(cfg, GRPO, MismatchConfig(), distributed=True)
        rows = policy_routes(policy, tokens.rows(a, b))
        metrics = policy.backward(rows, advantages[a:b], logp_rollout=logp_rollout[a:b])
        grads = {n: full_tensor(p.grad).clone() for n, p in policy.model.named_parameters() if p.requires_grad}
        metrics.update(policy.optimizer_step())
        per_rank = [None] * world
        dist.all_gather_object(per_rank, metrics)
        lora = policy.lora_tensors()
        if rank == 0:
            torch.save({"metrics": combine_rank_metrics(per_rank), "lora": lora, "grads": grads},
                       Path(out_dir) / f"mb{size}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
