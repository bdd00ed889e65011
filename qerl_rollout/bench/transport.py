"""`python -m qerl_rollout.bench sync --transport object_store collective`: the same pushes into
engine actors through each transport (`rollout.transport`).

How it works. A local Ray runs `--engines` `RolloutWorker` actors (vLLM in processes of their
own) on the cached synthetic 0.43B MoE (`--size`), serving `--scheme`. This process is the
trainer, one rank: the checkpoint with LoRA r16 on attention and experts (as in
`bench code_delta`). Per round, for each transport: a full push (`full=True`), then every LoRA
parameter moves by `--lr` (random signs) and a delta push (`sync.delta`) follows. Rounds
repeat (`--rounds`) and alternate the transports' order, so a drift in the machine's load hits
both alike. Every push of a round carries the same bytes into the same engines; only the road
differs. Reported per transport and kind: seconds per push (fastest and median) and wire
GB/s over them, and the same for the push's `load` + `commit` phases (the trainer putting or
sending buckets and waiting for the engines to load them: the part a transport changes;
merge, requantization and fingerprints are the same on both). Also checked, not timed: after each push the
engines hold what was sent (`received_digests`).

Output: a table and JSON (`--out`, default bench/results/transport.json).

Left out: several trainer ranks (only rank 0 sends, on both transports), several nodes (on
one machine the object store is shared memory and gloo runs over loopback TCP), GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from qerl_rollout.bench.models import (
    DEFAULT_MODELS_DIR,
    MODELS,
    environment,
    model_dir,
    write_result,
)
from qerl_rollout.config import QUANT_SCHEMES, TRANSPORTS

DEFAULT_OUT = Path("bench/results/transport.json")
CHOICES = tuple(t for t in TRANSPORTS if t != "auto")


def _receiver(transport: str, workers):
    from qerl_rollout.workers.collective import CollectiveWeightReceiver
    from qerl_rollout.workers.transport import RayWeightReceiver

    return (CollectiveWeightReceiver if transport == "collective" else RayWeightReceiver)(workers)


def _row(transport: str, kind: str, rnd: int, report, receiver) -> dict:
    received = receiver.received_digests()
    if any(r != report.digests for r in received):
        raise RuntimeError(f"{transport}: an engine holds other bytes than were sent")
    return {"transport": transport, "kind": kind, "round": rnd, "bytes_sent": report.bytes_sent,
            "seconds": report.seconds["total"], "load_s": report.seconds.get("load", 0.0),
            "commit_s": report.seconds.get("commit", 0.0), "phases": dict(report.seconds)}


def measure(path: Path, scheme: str, transports: list[str], engines: int, rounds: int, lr: float,
            bucket_mb: int) -> list[dict]:
    from qerl_rollout.bench.code_delta import _policy, lora_step
    from qerl_rollout.config import QuantConfig
    from qerl_rollout.placement.ray import local_ray
    from qerl_rollout.rollout.engine import prepare_export
    from qerl_rollout.sync.weight_sync import WeightSync
    from qerl_rollout.workers.rollout_worker import start_rollout_worker

    with local_ray(num_cpus=max(2, engines + 1)):
        export = prepare_export(path, QuantConfig(scheme))    # kernel mode loads an export
        workers = [start_rollout_worker(path, QuantConfig(scheme), num_cpus=1, seed=0,
                                        export_dir=None if export is None else str(export)) for _ in range(engines)]
        policy = _policy(path)
        lora = [p for n, p in policy.named_parameters() if "lora_" in n]
        # One delta sync per transport: its full pushes (`full=True`) go whole and leave the
        # engines the copies its delta pushes patch.
        syncs = {t: WeightSync(_receiver(t, workers), bucket_bytes=bucket_mb << 20, delta=True) for t in transports}
        for sync in syncs.values():     # the first push of a sync (a group forms): not timed
            sync.push(policy)
        g, rows = torch.Generator().manual_seed(0), []
        for rnd in range(rounds):
            order = transports if rnd % 2 == 0 else transports[::-1]
            for t in order:
                sync = syncs[t]
                rows.append(_row(t, "full", rnd, sync.push(policy, full=True, digest=True), sync.engine))
                lora_step(lora, lr, g)
                rows.append(_row(t, "delta", rnd, sync.push(policy, digest=True), sync.engine))
                print(f"round {rnd} {t}: full {rows[-2]['seconds']:.2f} s, delta {rows[-1]['seconds']:.2f} s",
                      flush=True)
        return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["transport"], r["kind"]) for r in rows):
        group = [r for r in rows if (r["transport"], r["kind"]) == key]
        seconds = [r["seconds"] for r in group]
        best = min(group, key=lambda r: r["seconds"])
        road = [r["load_s"] + r["commit_s"] for r in group]
        out.append({"transport": key[0], "kind": key[1], "pushes": len(group), "mb_sent": best["bytes_sent"] / 1e6,
                    "best_s": best["seconds"], "median_s": statistics.median(seconds),
                    "road_s": min(road), "road_median_s": statistics.median(road),
                    "gb_per_s": best["bytes_sent"] / best["seconds"] / 1e9,
                    "road_gb_per_s": best["bytes_sent"] / max(min(road), 1e-9) / 1e9})
    return out


def format_table(summary: list[dict]) -> str:
    lines = [f"{'transport':<14}{'push':<7}{'n':>3}{'MB sent':>10}{'push s':>8}{'median':>8}{'GB/s':>7}"
             f"{'load+commit s':>15}{'median':>8}{'GB/s':>7}"]
    for s in summary:
        lines.append(f"{s['transport']:<14}{s['kind']:<7}{s['pushes']:>3}{s['mb_sent']:>10.1f}{s['best_s']:>8.2f}"
                     f"{s['median_s']:>8.2f}{s['gb_per_s']:>7.2f}{s['road_s']:>15.2f}{s['road_median_s']:>8.2f}"
                     f"{s['road_gb_per_s']:>7.2f}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m qerl_rollout.bench sync --transport",
                                description="The same pushes through each transport (module docstring).")
    p.add_argument("--transport", nargs="+", choices=CHOICES, required=True)
    p.add_argument("--scheme", choices=QUANT_SCHEMES, default="int8")
    p.add_argument("--size", choices=sorted(MODELS), default="moe_430m")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5, help="LoRA step before each delta push")
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    path = model_dir(args.size, args.models_dir)
    rows = measure(path, args.scheme, list(dict.fromkeys(args.transport)), args.engines, args.rounds, args.lr,
                   args.bucket_mb)
    summary = summarize(rows)
    print(format_table(summary))
    write_result(args.out, {"benchmark": "sync --transport", "environment": environment(), "model": args.size,
                            "scheme": args.scheme, "engines": args.engines, "lr": args.lr,
                            "bucket_mb": args.bucket_mb, "wall_s": time.perf_counter() - t0,
                            "summary": summary, "rows": rows})
    print(f"wrote {args.out}")
    return 0
