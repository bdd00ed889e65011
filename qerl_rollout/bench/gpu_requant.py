"""GPU requantization benchmark: the Triton kernels against a device-to-device copy.

    python -m qerl_rollout.bench gpu_requant [--iters 50] [--check-experts 4] [--out PATH]
    python -m qerl_rollout.bench gpu_requant --cpu-smoke   # no GPU: tiny shapes, Triton interpreter

Needs torch and triton only: run from the repository root, nothing installed. For each case
(a 4096x4096 matrix; Qwen3-30B-A3B's stacked experts, 128 x 768 x 2048 and 128 x 2048 x 768)
and each scheme (fp8_block, fp8_channel, int8, nvfp4) it

1. checks bit-exactness on fresh random bf16 inputs (new seed each run, printed): the CUDA
   kernel's bytes against the project's own torch path (`qerl_rollout.quant.quantize`) run
   on CPU, for plain quantize and for fused merge+quantize (rank-16 LoRA, compared with
   `quantize(merge_lora_reference(...))`); for stacked experts the first `--check-experts`
   experts are compared (experts are independent, the CPU path is the slow part);
2. times quantize and fused merge+quantize with CUDA events: warm-up, then the median of
   `--iters` runs, each run on the next of several input buffers (together > 4x L2) so
   the input is never served from L2; the same for `dst.copy_(src)` of the same bf16 bytes.
   Each is timed twice: eagerly (events around each Python call, launch overhead included:
   what the weight sync sees) and replaying one CUDA graph per input buffer (device time;
   used for the table when capture works). The JSON holds both.

It prints a table (GB/s of bf16 input, fraction of copy bandwidth, fused/plain time) and
writes JSON (default bench/results/gpu_requant.json). Targets: quantize >= 70% of copy
bandwidth per scheme; fused <= 1.3x quantize alone. Exit status 1 if any byte differs,
2 without CUDA (unless --cpu-smoke).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch  # does not import triton: TRITON_INTERPRET can still be set in main()

CASES = {"dense_4096x4096": (4096, 4096),
         "experts_128x768x2048": (128, 768, 2048),
         "experts_128x2048x768": (128, 2048, 768)}
SMOKE_CASES = {"dense_160x288": (160, 288), "experts_3x96x256": (3, 96, 256)}
SCHEMES = ("fp8_block", "fp8_channel", "int8", "nvfp4")
LORA_RANK = 16
LORA_SCALING = 2.0  # alpha 32 / rank 16
TARGET_COPY_FRACTION = 0.70
TARGET_FUSED_RATIO = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qerl_rollout.bench gpu_requant",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=50, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-experts", type=int, default=4,
                   help="experts of each stacked case compared with the CPU reference")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu_requant.json"))
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: run the script's logic on tiny CPU shapes via TRITON_INTERPRET")
    return p.parse_args(argv)


# --- inputs -----------------------------------------------------------------------------

def random_weight(shape, device, gen):
    """bf16 weight with per-row magnitudes over 2**-6..2**2 and a few exact zeros."""
    w = torch.randn(shape, device=device, generator=gen)
    w *= torch.exp2(torch.randint(-6, 3, shape[:-1] + (1,), device=device, generator=gen).float())
    w = w.to(torch.bfloat16)
    w[..., :1, :64] = 0.0
    return w


def random_lora(shape, device, gen):
    lead, (N, K) = shape[:-2], shape[-2:]
    a = (torch.randn(lead + (LORA_RANK, K), device=device, generator=gen) / K**0.5)
    b = torch.randn(lead + (N, LORA_RANK), device=device, generator=gen) * 0.02
    return a.to(torch.bfloat16), b.to(torch.bfloat16)


# --- exactness --------------------------------------------------------------------------

def leading(tensors: dict, k: int | None) -> dict:
    return {key: (t if k is None else t[:k]).cpu() for key, t in tensors.items()}


def count_mismatched_bytes(got: dict, want: dict) -> int:
    if set(got) != set(want):
        raise AssertionError(f"keys differ: {sorted(got)} vs {sorted(want)}")
    bad = 0
    for key, want_t in want.items():
        g, w = got[key].contiguous(), want_t.contiguous()
        if g.dtype != w.dtype or g.shape != w.shape:
            raise AssertionError(f"{key}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}")
        bad += int((g.view(-1).view(torch.uint8) != w.view(-1).view(torch.uint8)).sum())
    return bad


def check_exact(kernels, reference, scheme, w, a, b, check_experts) -> dict:
    """Mismatched bytes of plain and fused kernels vs the CPU torch path (0 == bit-exact)."""
    k = check_experts if w.dim() == 3 else None
    w_cpu = w[:k].cpu() if k else w.cpu()
    a_cpu, b_cpu = (a[:k].cpu(), b[:k].cpu()) if k else (a.cpu(), b.cpu())
    plain = count_mismatched_bytes(leading(kernels.quantize_triton(w, scheme), k),
                                   reference(w_cpu, scheme).compressed())
    merged_cpu = kernels.merge_lora_reference(w_cpu, a_cpu, b_cpu, LORA_SCALING)
    fused = count_mismatched_bytes(
        leading(kernels.merge_quantize_triton(w, a, b, LORA_SCALING, scheme), k),
        reference(merged_cpu, scheme).compressed())
    return {"plain_mismatched_bytes": plain, "fused_mismatched_bytes": fused}


# --- timing -----------------------------------------------------------------------------

def median_ms(fn, inputs: list, iters: int, warmup: int, cuda: bool) -> float:
    """Median time of fn(inputs[i % len(inputs)]) in ms: CUDA events around each call on a
    GPU (so it includes Python launch overhead when the GPU outruns the CPU), wall clock on CPU."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    if not cuda:
        times = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(inputs[i % len(inputs)])
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graph_median_ms(fn, inputs: list, iters: int, warmup: int) -> float | None:
    """As median_ms, but each call replays a CUDA graph captured per input buffer, which
    removes the CPU launch overhead (device time only). None if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for x in inputs:
                fn(x)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for x in inputs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(x)
            graphs.append(graph)
    except Exception as exc:  # noqa: BLE001 - fall back to eager timing, say why
        print(f"  (CUDA graph capture failed: {exc!r}; eager timing only)")
        return None
    ms = median_ms(lambda g: g.replay(), graphs, iters, warmup, cuda=True)
    del graphs
    return ms


def timed(fn, inputs: list, args, cuda: bool) -> dict:
    """{'eager_ms', 'graph_ms', 'ms'}; 'ms' is the graph time when there is one."""
    eager = median_ms(fn, inputs, args.iters, args.warmup, cuda)
    graph = graph_median_ms(fn, inputs, args.iters, args.warmup) if cuda else None
    return {"eager_ms": eager, "graph_ms": graph, "ms": graph if graph is not None else eager}


def buffer_count(nbytes: int, cuda: bool) -> int:
    """Enough rotating input buffers that together they exceed 4x the L2 cache."""
    if not cuda:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
    return max(2, math.ceil(4 * l2 / nbytes))


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# --- one case ---------------------------------------------------------------------------

def run_case(name, shape, kernels, reference, args, device, gen) -> list[dict]:
    cuda = device.type == "cuda"
    nbytes = math.prod(shape) * 2
    n_buf = buffer_count(nbytes, cuda)
    weights = [random_weight(shape, device, gen) for _ in range(n_buf)]
    loras = [random_lora(shape, device, gen) for _ in range(n_buf)]
    dst = torch.empty_like(weights[0])
    copy = timed(lambda w: dst.copy_(w), weights, args, cuda)
    print(f"\n{name}: {tuple(shape)} bf16, {nbytes / 1e6:.0f} MB, {n_buf} rotating buffers, "
          f"copy {copy['ms']:.3f} ms = {gbps(nbytes, copy['ms']):.0f} GB/s")
    print(HEADER, flush=True)
    rows = []
    for scheme in args.schemes:
        exact = (check_exact(kernels, reference, scheme, weights[0], *loras[0], args.check_experts)
                 if reference else {"plain_mismatched_bytes": None, "fused_mismatched_bytes": None})
        quant = timed(lambda w, s=scheme: kernels.quantize_triton(w, s), weights, args, cuda)
        fused_inputs = [(w, a, b) for w, (a, b) in zip(weights, loras)]
        fused = timed(
            lambda x, s=scheme: kernels.merge_quantize_triton(*x, LORA_SCALING, s),
            fused_inputs, args, cuda)
        rows.append({"case": name, "shape": list(shape), "scheme": scheme,
                     "input_bytes": nbytes, "copy_ms": copy["ms"], "quant_ms": quant["ms"],
                     "fused_ms": fused["ms"], "quant_gbps": gbps(nbytes, quant["ms"]),
                     "copy_gbps": gbps(nbytes, copy["ms"]),
                     "copy_fraction": copy["ms"] / quant["ms"],
                     "fused_ratio": fused["ms"] / quant["ms"],
                     "eager": {"copy_ms": copy["eager_ms"], "quant_ms": quant["eager_ms"],
                               "fused_ms": fused["eager_ms"]},
                     "timing": "cuda_graph" if quant["graph_ms"] is not None else "eager",
                     **exact})
        print_row(rows[-1])
    return rows


# --- report -----------------------------------------------------------------------------

HEADER = (f"{'case':<22} {'scheme':<12} {'quant ms':>9} {'GB/s':>7} {'of copy':>8} "
          f"{'fused ms':>9} {'fused/q':>8} {'exact':>12}")


def print_row(r: dict) -> None:
    def mark(n):
        return "?" if n is None else ("yes" if n == 0 else f"NO({n})")

    exact = f"{mark(r['plain_mismatched_bytes'])}/{mark(r['fused_mismatched_bytes'])}"
    print(f"{r['case']:<22} {r['scheme']:<12} {r['quant_ms']:>9.3f} {r['quant_gbps']:>7.0f} "
          f"{r['copy_fraction']:>7.0%} {r['fused_ms']:>9.3f} {r['fused_ratio']:>7.2f}x "
          f"{exact:>12}", flush=True)


def summarize(rows: list[dict]) -> dict:
    mismatched = [r for r in rows if r["plain_mismatched_bytes"] or r["fused_mismatched_bytes"]]
    return {"all_exact": not mismatched and all(r["plain_mismatched_bytes"] is not None
                                               for r in rows),
            "copy_fraction_target_met": all(r["copy_fraction"] >= TARGET_COPY_FRACTION
                                            for r in rows),
            "fused_ratio_target_met": all(r["fused_ratio"] <= TARGET_FUSED_RATIO for r in rows),
            "mismatched_rows": [(r["case"], r["scheme"]) for r in mismatched]}


def load_reference():
    """The project's torch quantize (run on CPU tensors), or None with a message."""
    try:
        from qerl_rollout.quant import quantize
    except Exception as exc:  # noqa: BLE001 - report any import failure, keep timing
        print(f"WARNING: qerl_rollout.quant is not importable ({exc!r}); exactness unchecked")
        return None
    return quantize


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_requant: no CUDA device visible; this benchmark needs a GPU "
              "(use --cpu-smoke to exercise the script on CPU).", file=sys.stderr)
        return 2
    import triton

    from qerl_rollout.quant.kernels import triton_kernels as kernels

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    seed = int(time.time()) % (2**31)
    gen = torch.Generator(device=device).manual_seed(seed)
    cases = SMOKE_CASES if args.cpu_smoke else CASES
    reference = load_reference()
    name = "cpu (TRITON_INTERPRET)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}, seed {seed}")
    rows = []
    for case, shape in cases.items():
        rows += run_case(case, shape, kernels, reference, args, device, gen)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the case's buffers are gone with run_case's frame
    summary = summarize(rows)
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": name, "torch": torch.__version__, "triton": triton.__version__, "seed": seed,
        "iters": args.iters, "lora_rank": LORA_RANK, "targets": {
            "copy_fraction": TARGET_COPY_FRACTION, "fused_ratio": TARGET_FUSED_RATIO},
        "summary": summary, "results": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0 if not summary["mismatched_rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
