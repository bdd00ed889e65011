"""GRPO on a tiny random MoE, on a CPU, through the library's one controller loop.

    python examples/grpo_tiny_cpu.py --steps 25 --scheme fp8_block
    python examples/grpo_tiny_cpu.py --steps 25 --scheme int8 rollout.baseline_every=5

This is `python -m qerl_rollout.train` from Python: the embedded config
(`configs/grpo_tiny_cpu.yaml`: a tiny random Qwen3-MoE built in the run directory, LoRA r16 on
attention and lm_head, the synthetic `digits` task, 8 prompts x 8 samples of 8 tokens) with a
few flags and any `section.key=value` override, run by `qerl_rollout.train.run` (rollout ->
reward -> group advantages -> GRPO step with truncated importance sampling -> weight push, see
its docstring). The curve is read back from the run's `metrics.jsonl`; `--out` writes it as
JSON, and the run directory keeps the report, checkpoint and adapter.

Why LoRA on `lm_head`: the tiny model's `lm_head` rows are N(0, 0.02) behind a final RMSNorm,
so with a frozen `lm_head` no hidden state puts more than ~44% of the next-token probability
on digit tokens; LoRA on attention alone plateaus near the start (examples/README.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile

from qerl_rollout import train
from qerl_rollout.config import load_config
from qerl_rollout.tracking import read_metrics


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheme", default="fp8_block", help="bf16, fp8_block, fp8_channel, int8, nvfp4")
    p.add_argument("--task", default="digits", choices=["digits", "digit_count"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the curve here as JSON")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    out_dir = tempfile.mkdtemp(prefix="grpo_tiny_cpu-")
    cfg = load_config(["config=grpo_tiny_cpu", f"run.steps={args.steps}",
                       f"rollout.scheme={args.scheme}", f"task.synthetic={args.task}",
                       f"run.seed={args.seed}", f"run.output_dir={out_dir}",
                       "tracking.run_name=example", "tracking.wandb_mode=disabled", *overrides])
    summary = train.run(cfg)
    curve = [{k: r.get(k) for k in ("step", "reward/mean", "loss/policy", "rollout_corr/k3_kl",
                                    "sync/mb", "rollout/version")} for r in read_metrics(summary["run_dir"])]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "curve": curve}, f, indent=1)
    print(f"reward {summary['reward_first5']:.2f} -> {summary['reward_last5']:.2f}; "
          f"run directory {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
