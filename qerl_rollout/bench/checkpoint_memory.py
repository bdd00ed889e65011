"""Host memory of a sharded trainer's model load, checkpoint save and checkpoint load, per rank.

    python -m qerl_rollout.bench checkpoint_memory [--model moe_430m] [--ranks 2] [--out PATH]

How it works. `--ranks` gloo processes (torch.multiprocessing) each build the FSDP2 policy
(`Policy(distributed=True)`: rank 0 reads the checkpoint and broadcasts it, the others build on
the meta device), take one GRPO step (so AdamW has moments), `save_state` into a temporary
directory, zero nothing and `load_state` it back. A thread samples the process's resident set
(psutil, every 2 ms) through each phase; a phase's figure is its peak above the RSS it started
from. They are set against the model's BF16 bytes and a rank's shard of the trainable state
(LoRA fp32 + both AdamW moments: 12 bytes per parameter, divided by the ranks): a save or a
load that gathered the model or the state would show that many bytes. RSS counts pages the
process touches, so allocator caching makes the figures upper bounds; the ranks share the
machine, so they are per process, not per node. Prints a table and writes JSON (default
bench/results/checkpoint_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 1 << 20


class PeakRSS:
    """The peak resident set of this process above its value at entry, sampled every 2 ms."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()

    def __enter__(self):
        self.start = self._process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
        self.above_mib = (self.peak - self.start) / MIB


def _rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    import peft  # noqa: F401 - imported before the first phase, so its figure is the model's
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401

    from qerl_rollout.rl.grpo import GRPOConfig
    from qerl_rollout.rl.policy import Policy, PolicyConfig, TokenBatch
    from qerl_rollout.workers.trainer import row_blocks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = PolicyConfig(model_path=model_dir, device="cpu", lora_rank=16, micro_batch_size=4)
    with PeakRSS() as build:
        policy = Policy(cfg, GRPOConfig(group_size=2), distributed=True)
    g = torch.Generator().manual_seed(0)
    rows = 8
    batch = TokenBatch.from_token_lists([torch.randint(3, 500, (16,), generator=g).tolist()] * rows,
                                        [torch.randint(3, 500, (16,), generator=g).tolist()] * rows, 0)
    a, b = row_blocks(rows, world)[rank]
    policy.train_step(batch.rows(a, b), torch.randn(rows, generator=g)[a:b], torch.zeros(b - a, 16))
    ckpt = Path(out) / "ckpt"
    with PeakRSS() as save:
        policy.save_state(ckpt)
    with PeakRSS() as load:
        policy.load_state(ckpt)
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)   # global sizes
    model_bytes = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    row = {"rank": rank, "model_mib": model_bytes / MIB, "state_shard_mib": trainable * 12 / world / MIB,
           "build_peak_above_mib": build.above_mib, "save_peak_above_mib": save.above_mib,
           "load_peak_above_mib": load.above_mib, "rss_after_mib": load.peak / MIB}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def measure(model_dir: Path, ranks: int) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(ranks, port, str(model_dir), out), nprocs=ranks, start_method="spawn")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(ranks)]


def table(rows: list[dict]) -> str:
    head = (f"model {rows[0]['model_mib']:,.0f} MiB BF16; a rank's shard of LoRA + AdamW state "
            f"{rows[0]['state_shard_mib']:,.1f} MiB\n")
    lines = [f"{'rank':>4}  {'model load':>11}  {'save':>8}  {'load':>8}  (peak RSS above the phase's start, MiB)"]
    for r in rows:
        lines.append(f"{r['rank']:>4}  {r['build_peak_above_mib']:>11,.1f}  {r['save_peak_above_mib']:>8,.1f}  "
                     f"{r['load_peak_above_mib']:>8,.1f}")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qerl_rollout.bench.models import DEFAULT_MODELS_DIR, MODELS, environment, model_dir

    ap = argparse.ArgumentParser(prog="python -m qerl_rollout.bench checkpoint_memory",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="moe_430m", choices=sorted(MODELS))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    ap.add_argument("--out", type=Path, default=Path("bench/results/checkpoint_memory.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = measure(model_dir(args.model, args.models_dir), args.ranks)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "ranks": rows, "environment": environment()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
