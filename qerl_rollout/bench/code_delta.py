"""`python -m qerl_rollout.bench code_delta`: how many quantized codes a LoRA step changes, and
what a delta push (`sync.delta`) then sends.

How it works. The checkpoint (`--model DIR`, or the cached synthetic `--size`) gets LoRA
(rank 16) on the attention projections and the fused experts, and is pushed once in full
through a delta `WeightSync` into a receiver that does what an engine does with a delta push
before vLLM sees it (`wire.delta.HeldTensors`: keep copies, apply and check patches) and then
drops the tensors (no engine: the bytes are what is measured). Then, per learning rate,
`--steps` times: every LoRA parameter moves by `lr` in a random sign, as Adam's first steps
move each parameter by about `lr`, and the push reports `sync/changed_code_fraction`
(`sync.code_delta`: 64-byte blocks of codes that changed, overall and per module kind), the
bytes it sent against those of the same tensors whole, and its seconds: the sender's
`code_delta` phase (fingerprints and patches) and the receiver's apply. Per scheme.

Output: a table and JSON (`--out`, default bench/results/code_delta.json).

Left out: a real optimizer and real gradients (Adam's later steps are smaller than `lr` where
gradients are noisy), the transport (a delta push sends `wire` of the bytes: its time on any
link is that share of a full push's), and the engine load (timed by `bench sync`).
"""

from __future__ import annotations

import argparse
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
from qerl_rollout.quant import SCHEMES
from qerl_rollout.quant.plan import Precision
from qerl_rollout.wire.delta import HeldTensors

DEFAULT_OUT = Path("bench/results/code_delta.json")


class _Holder:
    """A `WeightReceiver` (kernel mode: it gets the codes) that resolves delta pushes as an
    engine does, times it, and drops the tensors."""

    mode, precision, version = "kernel", Precision(), 0

    def __init__(self, scheme: str, manifest: dict):
        self.scheme, self._manifest = scheme, manifest
        self.held, self.apply_s = HeldTensors(), 0.0

    def manifest(self):
        return self._manifest

    def begin_update(self, version, digest=False, delta=False):
        self.apply_s = 0.0
        self.held.begin() if delta else self.held.clear()

    def load(self, named_tensors):
        t0 = time.perf_counter()
        self.held.apply(named_tensors)
        self.apply_s += time.perf_counter() - t0

    def commit(self, version):
        self.held.commit()
        self.version = version

    def abort(self, reason):
        self.held.abort()


def _policy(path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, cfg)


def lora_step(lora: list[torch.Tensor], lr: float, g: torch.Generator) -> None:
    """Every LoRA parameter moves by `lr` in a random sign, as Adam's first steps move each
    parameter by about `lr`."""
    with torch.no_grad():
        for p in lora:
            p.add_(lr * torch.randint(0, 2, p.shape, generator=g).mul(2).sub(1).to(p.dtype))


def measure(path: Path, scheme: str, lrs: list[float], steps: int, seed: int = 0) -> list[dict]:
    """One row per (lr, step): the changed-code fractions and the push's seconds."""
    from qerl_rollout.rollout.engine import read_manifest
    from qerl_rollout.sync.weight_sync import WeightSync

    policy = _policy(path)
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    receiver = _Holder(scheme, read_manifest(path))
    sync = WeightSync(receiver, delta=True)

    def row(lr, step, r):
        return {"scheme": scheme, "lr": lr, "step": step, "fractions": r.changed_code_fraction,
                "bytes_sent": r.bytes_sent, "bytes_whole": r.bytes_whole, "seconds": r.seconds["total"],
                "code_delta_s": r.seconds.get("code_delta", 0.0), "apply_s": receiver.apply_s}

    rows = [row(0.0, 0, sync.push(policy))]
    g = torch.Generator().manual_seed(seed)
    for lr in lrs:
        for step in range(1, steps + 1):
            lora_step(lora, lr, g)
            rows.append(row(lr, step, sync.push(policy)))
    return rows


def format_table(rows: list[dict]) -> str:
    kinds = sorted({k for r in rows for k in r["fractions"] if k != "all"})
    out = [f"{'scheme':<12}{'lr':>8}{'step':>5}{'changed blocks':>16}" + "".join(f"{k:>14}" for k in kinds)
           + f"{'MB whole':>10}{'MB sent':>9}{'wire':>7}{'push s':>8}{'delta s':>9}{'apply s':>9}"]
    for r in rows:
        f = r["fractions"]
        cells = [f"{100 * f[k]:>15.1f}%" if k == "all" and k in f else f"{100 * f[k]:>13.1f}%" if k in f
                 else f"{'-':>16}" if k == "all" else f"{'-':>14}" for k in ["all", *kinds]]
        lr = "full" if r["step"] == 0 else f"{r['lr']:g}"
        wire = r["bytes_sent"] / max(r["bytes_whole"], 1)
        out.append(f"{r['scheme']:<12}{lr:>8}{r['step']:>5}" + "".join(cells)
                   + f"{r['bytes_whole'] / 1e6:>10.1f}{r['bytes_sent'] / 1e6:>9.1f}{100 * wire:>6.1f}%"
                   + f"{r['seconds']:>8.2f}{r['code_delta_s']:>9.3f}{r['apply_s']:>9.3f}")
    return "\n".join(out)


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m qerl_rollout.bench code_delta",
                                description="How many quantized codes a LoRA step changes (module docstring).")
    p.add_argument("--model", type=Path, help="checkpoint dir (default: the cached --size model)")
    p.add_argument("--size", choices=sorted(MODELS), default="moe_430m")
    p.add_argument("--schemes", nargs="+", choices=sorted(SCHEMES), default=["int8", "fp8_block", "nvfp4"])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 1e-4, 1e-3])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.steps < 1 or any(lr <= 0 for lr in args.lrs):
        raise SystemExit("error: --steps must be >= 1 and every --lrs value > 0")
    torch.set_num_threads(args.threads)
    path = args.model or model_dir(args.size, args.models_dir)
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"error: {path} has no config.json")
    rows = [row for scheme in args.schemes for row in measure(Path(path), scheme, args.lrs, args.steps)]
    print(format_table(rows))
    write_result(args.out, {"benchmark": "code_delta", "environment": environment(), "model": str(path),
                            "threads": args.threads, "rows": rows})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
