"""`python -m qerl_rollout.report RUN_DIR`: the curves a user looks at first, as one PNG.

How it works. `write_report(run_dir)` reads `metrics.jsonl` (`tracking.read_metrics`) and draws
nine panels with matplotlib's Agg backend (no display needed) into `run_dir/report.png`:
reward (train, and eval when the run evaluated, with the BF16 twin's), mismatch (KL k3 between
rollout and trainer, mean IS weight), rollout tokens/s (and the measured speedup over BF16 on
a second axis), weight sync (seconds and MB per push), step time split by phase (rollout,
train, sync, stacked), router top-k agreement and flip rate, and for a MoE model three
heatmaps: the trainer's and the rollout's expert load per layer x expert (tokens over the
run, over the layer's mean; from `experts.jsonl`, the newest line of each step) and the flip
rate per layer x step. A metric the run did not log leaves its panel saying so instead of
failing. The training entry point writes the report at
the end of every run and names it in the summary. Left out: comparing several runs (wandb).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPORT_FILE = "report.png"
EXPERTS_FILE = "experts.jsonl"     # per step: {"step", "names", "trainer", "rollout"} expert counts


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


def _expert_counts(run_dir: Path) -> dict[str, list | None]:
    """Summed (layers, experts) counts of the trainer and the rollout over the run's steps."""
    import json

    path = run_dir / EXPERTS_FILE
    steps = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                steps[record["step"]] = record          # a resumed run's line replaces the killed one's
    out = {"names": None, "trainer": None, "rollout": None}
    for record in steps.values():
        out["names"] = record["names"]
        for side in ("trainer", "rollout"):
            if record.get(side) is not None:
                counts = record[side]
                out[side] = counts if out[side] is None else [[a + b for a, b in zip(x, y)]
                                                              for x, y in zip(out[side], counts)]
    return out


def _heatmap(fig, ax, image, title, xlabel, ylabel, yticks, cbar, xticks=None):
    ax.set_title(title)
    if image is None:
        ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
        return
    shown = ax.imshow(image, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
    if xticks:
        every = max(1, len(xticks) // 10)
        ax.set_xticks(range(0, len(xticks), every), xticks[::every])
    fig.colorbar(shown, ax=ax, label=cbar)


def _over_mean(counts):
    """Each layer's counts over that layer's mean (1 = a balanced expert)."""
    return None if counts is None else [[c / (sum(row) / len(row) or 1) for c in row] for row in counts]


def _flip_rates(rows) -> tuple[list | None, list[str], list[int]]:
    """(layers, logged steps) of router/flip_rate/layer<i>, the layer labels and the steps."""
    layers = sorted({k.rsplit("/", 1)[1] for r in rows for k in r if k.startswith("router/flip_rate/")},
                    key=lambda label: int(label.removeprefix("layer")))
    steps = [r for r in rows if any(f"router/flip_rate/{layer}" in r for layer in layers)]
    if not steps:
        return None, [], []
    return ([[r.get(f"router/flip_rate/{layer}", float("nan")) for r in steps] for layer in layers], layers,
            [r["step"] for r in steps])


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
    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
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
    counts = _expert_counts(run_dir)
    labels = [name.split(".")[2] if name.count(".") > 2 else name for name in counts["names"] or []]
    for ax, side in zip(axes[2, :2], ("trainer", "rollout")):
        _heatmap(fig, ax, _over_mean(counts[side]), f"expert load, {side} (run total)", "expert",
                 "MoE layer", labels, "tokens / layer mean")
    flips, layers, steps = _flip_rates(rows)
    _heatmap(fig, axes[2, 2], flips, "tokens routed otherwise, per layer", "step", "layer", layers,
             "flip rate", steps)
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
