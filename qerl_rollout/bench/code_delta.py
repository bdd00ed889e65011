"""`python -m qerl_rollout.bench code_delta`: how many quantized codes a LoRA step changes.

How it works. The checkpoint (`--model DIR`, or the cached synthetic `--size`) gets LoRA
(rank 16) on the attention projections and the fused experts, and is pushed once in full
through `WeightSync` into a receiver that drops what it gets (no engine: the codes are what is
measured). Then, per learning rate, `--steps` times: every LoRA parameter moves by `lr` in a
random sign, as Adam's first steps move each parameter by about `lr`, and the delta push
reports `sync/changed_code_fraction` (`sync.code_delta`: rows of codes that changed, overall and
per module kind) and its seconds, of which `code_delta` is the fingerprinting. Per scheme.

Output: a table and JSON (`--out`, default bench/results/code_delta.json).

Left out: a real optimizer and real gradients (Adam's later steps are smaller than `lr` where
gradients are noisy), and the engine load (timed by `bench sync`).
"""

from __future__ import annotations

import argparse
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

DEFAULT_OUT = Path("bench/results/code_delta.json")


class _Sink:
    """A `WeightReceiver` that drops what it is sent (kernel mode: it gets the codes)."""

    mode, precision, version = "kernel", Precision(), 0

    def __init__(self, scheme: str, manifest: dict):
        self.scheme, self._manifest = scheme, manifest

    def manifest(self):
        return self._manifest

    def begin_update(self, version, digest=False):
        pass

    def load(self, named_tensors):
        pass

    def commit(self, version):
        self.version = version

    def abort(self, reason):
        pass


def _policy(path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, cfg)


def measure(path: Path, scheme: str, lrs: list[float], steps: int, seed: int = 0) -> list[dict]:
    """One row per (lr, step): the changed-code fractions and the push's seconds."""
    from qerl_rollout.rollout.engine import read_manifest
    from qerl_rollout.sync.weight_sync import WeightSync

    policy = _policy(path)
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    sync = WeightSync(_Sink(scheme, read_manifest(path)))
    full = sync.push(policy)
    rows = [{"scheme": scheme, "lr": 0.0, "step": 0, "fractions": {}, "seconds": full.seconds["total"],
             "code_delta_s": full.seconds.get("code_delta", 0.0)}]
    g = torch.Generator().manual_seed(seed)
    for lr in lrs:
        for step in range(1, steps + 1):
            with torch.no_grad():
                for p in lora:
                    p.add_(lr * torch.randint(0, 2, p.shape, generator=g).mul(2).sub(1).to(p.dtype))
            r = sync.push(policy)
            rows.append({"scheme": scheme, "lr": lr, "step": step, "fractions": r.changed_code_fraction,
                         "seconds": r.seconds["total"], "code_delta_s": r.seconds.get("code_delta", 0.0)})
    return rows


def format_table(rows: list[dict]) -> str:
    kinds = sorted({k for r in rows for k in r["fractions"] if k != "all"})
    out = [f"{'scheme':<12}{'lr':>8}{'step':>5}{'changed rows':>14}" + "".join(f"{k:>14}" for k in kinds)
           + f"{'push s':>8}{'fingerprint s':>15}"]
    for r in rows:
        f = r["fractions"]
        cells = [f"{100 * f[k]:>13.1f}%" if k in f else f"{'-':>14}" for k in ["all", *kinds]]
        lr = "full" if r["step"] == 0 else f"{r['lr']:g}"
        out.append(f"{r['scheme']:<12}{lr:>8}{r['step']:>5}" + "".join(cells)
                   + f"{r['seconds']:>8.2f}{r['code_delta_s']:>15.3f}")
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
