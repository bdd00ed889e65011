"""One GRPO step of a fresh process, its peak RSS printed beside the plan's (tests/test_planner.py).

Run with MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every buffer over 64 KiB on its own and
unmaps it when freed, so the resident set follows the live tensors; with its default dynamic
threshold freed activations stay in the heap and a step's RSS never falls back.
argv: model_dir, gradient_checkpointing (0/1), then config overrides.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch

from qerl_rollout.bench.checkpoint_memory import MIB, PeakRSS
from qerl_rollout.config import load_config
from qerl_rollout.planner import GIB, count, model_config, plan
from qerl_rollout.rl.grpo import GRPOConfig
from qerl_rollout.rl.policy import Policy, TokenBatch

ROWS, PROMPT, RESPONSE = 16, 128, 128


def main(model_dir: str, checkpointing: str, *overrides: str) -> None:
    torch.set_num_threads(2)
    cfg = load_config(["config=grpo_tiny_cpu", f"model.path={model_dir}", f"policy.micro_batch_size={ROWS}",
                       f"task.max_prompt_tokens={PROMPT}", f"rollout.max_tokens={RESPONSE}",
                       f"policy.gradient_checkpointing={checkpointing == '1'}", *overrides])
    rows = {r["component"]: r["gib"] * GIB for r in plan(cfg, count(model_config(model_dir, ""), cfg.policy,
                                                                      cfg.rollout.scheme)).rows}
    policy = Policy(replace(cfg.policy, model_path=model_dir), GRPOConfig(group_size=4))
    g = torch.Generator().manual_seed(0)
    batch = TokenBatch.from_token_lists([torch.randint(3, 1000, (PROMPT,), generator=g).tolist() for _ in range(ROWS)],
                                        [torch.randint(3, 1000, (RESPONSE,), generator=g).tolist() for _ in range(ROWS)], 0)
    with PeakRSS() as step:
        policy.train_step(batch, torch.randn(ROWS, generator=g))
    planned = rows["activations (one micro-batch)"] + rows["LoRA grads (1/N)"] + rows["AdamW moments (1/N)"]
    print(json.dumps({"measured_mib": step.above_mib, "planned_mib": planned / MIB}))


if __name__ == "__main__":
    main(*sys.argv[1:])
