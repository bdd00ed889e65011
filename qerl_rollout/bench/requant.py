"""Requantization speed: GB/s of BF16 input per scheme, next to a memory copy and compressed-tensors.

How it works: for (a) a 4096x4096 matrix and (b) a stacked MoE expert tensor of
Qwen3-30B-A3B's shape (128 x 768 x 2048), all in one process, it times (best of a few runs)
a plain `copy_` of the same BF16 bytes, `qerl_rollout.quant.quantize` for each scheme, and
the compressed-tensors reference path (`kernels/ct_oracle.py`: observer + calculate_qparams
+ compressor), expert by expert on the MoE tensor (`--quick`: one expert, scaled to all; the
table says which). Timing runs with glibc's default allocator, as a trainer process has it.
Peak extra memory is measured in a fresh child process per scheme: the growth of its peak
resident set (VmHWM, reset just before) over one quantize call, as a multiple of the input bytes (the
outputs count). `--quick` does fewer runs; `--threads N` sets the thread count (on a shared,
busy machine one thread gives steadier ratios).

What it leaves out: GPUs, LoRA merging and transport (see the sync benchmark), and
first-call costs (the C++ build and torch.compile warm-up are excluded by a warm-up call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from qerl_rollout.quant import SCHEMES, quantize
from qerl_rollout.quant.kernels import cpu
from qerl_rollout.quant.kernels.ct_oracle import ct_compress

CASES = {"4096x4096": (4096, 4096), "moe 128x768x2048": (128, 768, 2048)}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: builds, caches, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def reference_seconds(w: torch.Tensor, scheme: str, n_experts: int) -> tuple[float, str]:
    """compressed-tensors on the whole 2-D weight, or on n_experts experts scaled to all."""
    if w.ndim == 2:
        return best_time(lambda: ct_compress(w, scheme), 1), "full tensor"
    n = min(n_experts, w.shape[0])
    seconds = best_time(lambda: [ct_compress(w[e], scheme) for e in range(n)], 1)
    return seconds * w.shape[0] / n, f"{n} of {w.shape[0]} experts, scaled"


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], object]:
    return lambda: dst.copy_(src)


def _quantize_fn(w: torch.Tensor, scheme: str) -> Callable[[], object]:
    return lambda: quantize(w, scheme)


def run_case(name: str, shape: tuple[int, ...], repeats: int, ref_experts: int) -> dict:
    w_bf16 = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    gb = w_bf16.numel() * w_bf16.element_size() / 1e9
    copy_s = best_time(_copy_into(torch.empty_like(w_bf16), w_bf16), repeats * 3)
    result = {"case": name, "shape": list(shape), "input_gb": gb, "copy_gbps": gb / copy_s, "schemes": {}}
    for scheme in SCHEMES:
        fast_s = best_time(_quantize_fn(w_bf16, scheme), repeats)
        ref_s, ref_note = reference_seconds(w_bf16, scheme, ref_experts)
        result["schemes"][scheme] = {
            "gbps": gb / fast_s,
            "vs_copy": copy_s / fast_s,
            "reference_gbps": gb / ref_s,
            "vs_reference": ref_s / fast_s,
            "reference_note": ref_note,
        }
    return result


_PEAK_CHILD = """
import torch
from qerl_rollout.quant import quantize

def hwm():   # peak resident set since the last reset, in bytes
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

w = torch.empty({shape}, dtype=torch.bfloat16)
for part in w.view(-1).split(1 << 20):   # filled in slices: no full-size temporary
    part.normal_(0.0, 0.02)
quantize(w[:1] if w.ndim == 3 else w[:16], {scheme!r})   # load the kernel first
with open("/proc/self/clear_refs", "w") as f:          # reset VmHWM to the current RSS
    f.write("5")
before = hwm()
out = quantize(w, {scheme!r})
print(hwm() - before)
"""


def add_peak_memory(result: dict) -> None:
    """Peak extra memory per scheme, from a fresh process's high-water mark.

    A child creates the weight, resets its peak RSS (VmHWM, via /proc/self/clear_refs) and
    reads it again after one quantize: the growth is what quantizing needed beyond the input,
    outputs included. (ru_maxrss would not do: a forked child starts from its parent's.)
    """
    for scheme, row in result["schemes"].items():
        code = _PEAK_CHILD.format(shape=tuple(result["shape"]), scheme=scheme)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        extra = int(out.stdout.strip().splitlines()[-1])
        row["peak_extra_bytes"] = extra
        row["peak_extra_vs_input"] = extra / (result["input_gb"] * 1e9)


def format_table(results: list[dict]) -> str:
    header = (
        f"{'case':<18} {'scheme':<12} {'GB/s':>7} {'copy GB/s':>9} {'vs copy':>8} "
        f"{'ref GB/s':>9} {'vs ref':>8} {'peak extra':>10}  reference timed on"
    )
    lines = [header]
    for r in results:
        for scheme, s in r["schemes"].items():
            lines.append(
                f"{r['case']:<18} {scheme:<12} {s['gbps']:7.2f} {r['copy_gbps']:9.2f} "
                f"{s['vs_copy']:7.0%} {s['reference_gbps']:9.4f} {s['vs_reference']:7.0f}x "
                f"{s['peak_extra_vs_input']:9.2f}x  {s['reference_note']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qerl_rollout.bench requant")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, one reference expert")
    parser.add_argument("--threads", type=int, help="torch/kernel threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, ref_experts = (2, 1) if args.quick else (5, 128)
    torch.manual_seed(0)
    results = [run_case(name, shape, repeats, ref_experts) for name, shape in CASES.items()]
    for result in results:
        add_peak_memory(result)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fast_path": "c++" if cpu.available() else "torch twin",
        "torch": torch.__version__,
    }
    print(f"requant benchmark ({meta['fast_path']} fast path, {meta['torch_threads']} threads, "
          f"{meta['cpu_count']} CPUs); GB/s of BF16 input, best of {repeats}")
    print(format_table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0
