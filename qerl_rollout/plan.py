"""`python -m qerl_rollout.plan config=NAME [key=value ...] [--gpu-gib G] [--gbps B] [--json FILE]`

Prints the memory table of a run per role and GPU before anything starts (`qerl_rollout.planner`:
trainer rank, engine, colocated phases, push bytes and time, host RAM), from the model's
config.json alone (`model.path`, or the shipped `model.shape`). Exit status 1 with one line
when a rank does not fit its GPU, 2 for a bad config.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from qerl_rollout.config import load_config
    from qerl_rollout.planner import count, model_config, plan

    p = argparse.ArgumentParser(prog="python -m qerl_rollout.plan", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="config=NAME and section.key=value, as for train")
    p.add_argument("--gpu-gib", type=float, help="memory of each GPU (default: placement.gpu_gib, 80)")
    p.add_argument("--gbps", type=float, default=10.0, help="transport bandwidth for the push time (GB/s)")
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)
    path = _given(args.overrides, "model.path")
    # A run needs model.path and task.path; a plan reads neither (the shape is enough), so a
    # placeholder passes the config's check where they are not given.
    unread = [f"{key}=<not read by plan>" for key in ("model.path", "task.path") if not _given(args.overrides, key)]
    try:
        cfg = load_config([*args.overrides, *unread])
        counts = count(model_config(path, cfg.model.shape), cfg.policy, cfg.rollout.scheme, cfg.rollout.precision)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = plan(cfg, counts, args.gpu_gib or cfg.placement.gpu_gib, args.gbps)
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
    if result.refusal:
        print(f"does not fit: {result.refusal}", file=sys.stderr)
        return 1
    return 0


def _given(overrides: list[str], key: str) -> str:
    """The value of `key` on the command line, else ""."""
    given = [a.split("=", 1)[1] for a in overrides if a.startswith(key + "=")]
    return given[-1] if given else ""


if __name__ == "__main__":
    sys.exit(main())
