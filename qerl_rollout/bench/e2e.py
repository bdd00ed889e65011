"""`python -m qerl_rollout.bench e2e`: does a quantized rollout make the whole RL step faster?

How it works. The same config, seeds and steps run once per scheme (`--schemes`, default the
config's own and bf16), each `python -m qerl_rollout.train` in a process of its own, one after
the other, with the BF16 baseline, the held-out eval and mid-run checkpoints off so that a
step is rollout, train and push only. From each run's metrics: per step the wall time
(`step/seconds`) and its phases (`rollout/seconds`, `train/seconds`, `sync/seconds`), the
rollout's tokens/s and the reward. Step 1 carries the engines' first-use costs and is left out
of the medians (it is in the JSON). Time to reward: the run's wall time, summed over steps,
until the reward mean of a step first reaches `--reward-level`.

Output: a table, the scheme's ratios to bf16 (of medians; the runs are minutes apart on a
shared machine, so a ratio near 1 is within noise), JSON (`--out`, default
bench/results/e2e.json) and a plot beside it (reward against wall time; phase seconds).
Extra `key=value` arguments go to every run (e.g. `rollout.max_tokens=64`).

Left out: GPUs (the same command runs there), and the quality of what is learned beyond the
reward curve (the rollout/trainer mismatch is in each run's own metrics).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from qerl_rollout.bench.models import environment, write_result

DEFAULT_OUT = Path("bench/results/e2e.json")
PHASES = ("step/seconds", "rollout/seconds", "train/seconds", "sync/seconds")
QUIET = ["rollout.baseline_every=0", "eval.every=0", "run.save_every=0", "tracking.wandb_mode=disabled"]


def run_scheme(config: str, scheme: str, steps: int, root: Path, extra: list[str]) -> list[dict]:
    """The metrics rows of one run (its own process)."""
    from qerl_rollout.tracking import read_metrics

    argv = [f"config={config}", f"rollout.scheme={scheme}", f"run.steps={steps}", f"run.output_dir={root}",
            f"tracking.run_name=e2e-{scheme}", *QUIET, *extra]
    print(f"{scheme}: python -m qerl_rollout.train {' '.join(argv)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "qerl_rollout.train", *argv], check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: the {scheme} run failed (exit {done.returncode})")
    return read_metrics(root / f"e2e-{scheme}")


def summarize(scheme: str, rows: list[dict], reward_level: float) -> dict:
    """Medians over steps 2.. of the phase seconds and tokens/s, rewards, time to reward."""
    later = rows[1:] or rows
    out = {"scheme": scheme, "steps": len(rows)}
    for key in (*PHASES, "rollout/tokens_per_s"):
        out[key] = statistics.median(r[key] for r in later)
    out["first_step_s"] = rows[0]["step/seconds"]
    rewards = [r["reward/mean"] for r in rows]
    out["reward_first"], out["reward_last"] = rewards[0], rewards[-1]
    out["time_to_reward_s"] = time_to_reward(rows, reward_level)
    return out


def time_to_reward(rows: list[dict], level: float) -> float | None:
    """Wall seconds summed over steps until a step's reward mean first reaches `level`."""
    elapsed = 0.0
    for r in rows:
        elapsed += r["step/seconds"]
        if r["reward/mean"] >= level:
            return elapsed
    return None


def ratios(summaries: list[dict]) -> dict[str, dict[str, float]]:
    """Each non-bf16 scheme's medians over bf16's (time: < 1 is faster; tokens/s: > 1)."""
    base = next((s for s in summaries if s["scheme"] == "bf16"), None)
    if base is None:
        return {}
    return {s["scheme"]: {k: s[k] / base[k] for k in (*PHASES, "rollout/tokens_per_s") if base[k]}
            for s in summaries if s is not base}


def format_table(summaries: list[dict], level: float) -> str:
    head = (f"{'scheme':<10}{'step s':>8}{'rollout s':>11}{'train s':>9}{'push s':>8}{'tok/s':>8}"
            f"{'first step s':>14}{'reward first->last':>20}{f'time to {level:g} s':>16}")
    lines = [head]
    for s in summaries:
        ttr = "-" if s["time_to_reward_s"] is None else f"{s['time_to_reward_s']:.1f}"
        lines.append(f"{s['scheme']:<10}{s['step/seconds']:>8.2f}{s['rollout/seconds']:>11.2f}"
                     f"{s['train/seconds']:>9.2f}{s['sync/seconds']:>8.2f}{s['rollout/tokens_per_s']:>8.0f}"
                     f"{s['first_step_s']:>14.1f}{s['reward_first']:>11.2f} -> {s['reward_last']:<5.2f}{ttr:>16}")
    for scheme, r in ratios(summaries).items():
        lines.append(f"{scheme} / bf16: step {r['step/seconds']:.2f}x, rollout {r['rollout/seconds']:.2f}x, "
                     f"train {r['train/seconds']:.2f}x, push {r['sync/seconds']:.2f}x, "
                     f"tokens/s {r['rollout/tokens_per_s']:.2f}x (medians over steps 2..)")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for scheme, rows in runs.items():
        elapsed, t = [], 0.0
        for r in rows:
            t += r["step/seconds"]
            elapsed.append(t)
        left.plot(elapsed, [r["reward/mean"] for r in rows], marker="o", label=scheme)
    left.set(xlabel="wall time (s)", ylabel="reward/mean", title="reward against wall time")
    left.legend()
    phases = ("rollout/seconds", "train/seconds", "sync/seconds")
    bottom = [0.0] * len(summaries)
    for phase in phases:
        values = [s[phase] for s in summaries]
        right.bar([s["scheme"] for s in summaries], values, bottom=bottom, label=phase.split("/")[0])
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set(ylabel="seconds (median step)", title="step time by phase")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m qerl_rollout.bench e2e", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="grpo_moe_cpu_int8", help="a shipped config name or a YAML path")
    p.add_argument("--schemes", nargs="+", help="default: the config's scheme and bf16")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reward-level", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--runs-dir", type=Path, help="where the runs go (default: a temporary directory)")
    args, extra = p.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are key=value)")
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 1 is left out of the medians)")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = _args(argv)
    from qerl_rollout.config import load_config

    schemes = args.schemes or list(dict.fromkeys([load_config([f"config={args.config}"]).rollout.scheme, "bf16"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs_dir or Path(tmp)
        runs = {s: run_scheme(args.config, s, args.steps, root, extra) for s in schemes}
    summaries = [summarize(s, rows, args.reward_level) for s, rows in runs.items()]
    print("\n" + format_table(summaries, args.reward_level))
    plot_path = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, summaries, plot_path)
    write_result(args.out, {"benchmark": "e2e", "environment": environment(), "config": args.config,
                            "overrides": extra, "steps": args.steps, "reward_level": args.reward_level,
                            "summaries": summaries, "ratios_to_bf16": ratios(summaries), "runs": runs})
    print(f"\nwrote {args.out} and {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
