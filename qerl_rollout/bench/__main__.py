"""Dispatch `python -m qerl_rollout.bench <name> [args]` to one benchmark module's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {"requant": "qerl_rollout.bench.requant", "sync": "qerl_rollout.bench.sync",
              "rollout": "qerl_rollout.bench.rollout", "gpu_requant": "qerl_rollout.bench.gpu_requant",
              "device_memory": "qerl_rollout.bench.device_memory",
              "checkpoint_memory": "qerl_rollout.bench.checkpoint_memory",
              "sensitivity": "qerl_rollout.bench.sensitivity", "code_delta": "qerl_rollout.bench.code_delta",
              "e2e": "qerl_rollout.bench.e2e"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m qerl_rollout.bench {{{','.join(BENCHMARKS)}}} [args]", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
