"""`python -m qerl_rollout.report RUN_DIR`: the curves a user looks at first, as one PNG.

How it works. `write_report(run_dir)` reads `metrics.jsonl` (`tracking.read_metrics`) and draws
six panels with matplotlib's Agg backend (no display needed) into `run_dir/report.png`:
reward (train, and eval when the run evaluated, with the BF16 twin's), mismatch (KL k3 between
rollout and trainer, mean IS weight), rollout tokens/s (and the measured speedup over BF16 on
a second axis), weight sync (seconds and MB per push), step time split by phase (rollout,
train, sync, stacked), and router top-k agreement when measured. A metric the run did not log
leaves its panel saying so instead of failing. The training entry point writes the report at
the end of every run and names it in the summary. Left out: comparing several runs (wandb).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPORT_FILE = "report.png"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plot(ax, rows, keys_labels, title, ylabel=None):
    drawn = False
    for key, label in keys_labels:
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
    return drawn


def _right_axis(ax, rows, key, label, ylabel, hline=None):
    """`key` on a second y axis (its own scale), dashed red."""
    x, y = _series(rows, key)
    if not x:
        return
    twin = ax.twinx()
    twin.plot(x, y, "s--", color="tab:red", markersize=4, label=label)
    if hline is not None:
        twin.axhline(hline, color="tab:red", linewidth=0.5)
    twin.set_ylabel(ylabel)
    twin.legend(fontsize=8, loc="lower right")


def _phase_panel(ax, rows):
    phases = [("rollout/seconds", "rollout"), ("train/seconds", "train"), ("sync/seconds", "sync")]
    steps = [r["step"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, label in phases:
        values = [r.get(key) or 0.0 for r in rows]
        ax.bar(steps, values, bottom=bottom, label=label, width=0.8)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title("step time by phase")
    ax.set_xlabel("step")
    ax.set_ylabel("s")
    ax.legend(fontsize=8)


def write_report(run_dir: str | Path) -> Path:
    """Draw `run_dir/report.png` from the run's metrics; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qerl_rollout.tracking import read_metrics

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no metrics to report")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    _plot(axes[0, 0], rows, [("reward/mean", "train"), ("eval/reward", "eval"),
                             ("eval/reward_bf16", "eval, BF16")], "reward")
    _plot(axes[0, 1], rows, [("rollout_corr/k3_kl", "KL(rollout || trainer), k3")],
          "rollout/trainer mismatch", "KL")
    _right_axis(axes[0, 1], rows, "mismatch/is_weight_mean", "mean IS weight", "IS weight", 1.0)
    _plot(axes[0, 2], rows, [("rollout/tokens_per_s", "quantized engine")], "rollout speed", "tokens/s")
    _right_axis(axes[0, 2], rows, "rollout/speedup_vs_bf16", "speedup vs BF16", "x BF16", 1.0)
    _plot(axes[1, 0], rows, [("sync/seconds", "push seconds")], "weight sync", "s")
    _right_axis(axes[1, 0], rows, "sync/mb", "push MB", "MB")
    _phase_panel(axes[1, 1], rows)
    _plot(axes[1, 2], rows, [("router/topk_agreement", "top-k agreement, trainer vs rollout"),
                             ("router/flip_rate", "tokens routed otherwise")], "routers: agreement and expert load")
    _right_axis(axes[1, 2], rows, "experts/trainer/max_over_mean", "busiest expert / mean (trainer)",
                "x mean load", 1.0)
    fig.suptitle(f"{run_dir.name}: {len(rows)} steps")
    fig.tight_layout()
    out = run_dir / REPORT_FILE
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m qerl_rollout.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(write_report(argv[0]))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
