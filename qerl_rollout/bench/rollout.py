"""`python -m qerl_rollout.bench rollout`: rollout tokens/s of quantized engines vs BF16, and the cost.

What it measures, in one process and one sitting. One engine per scheme (`--schemes`, default
bf16 and int8; each with `mode=auto`, so int8 runs vLLM's quantized kernels where this CPU has
them and the others emulate) is started on the same checkpoint, `--model DIR` or the cached
synthetic 0.43B Qwen3-MoE `moe_430m` (hidden 1024, 8 layers, 32 experts of width 512, top-4;
experts are 95% of the parameters). All engines stay alive, and every round times the same
RL-shaped batch on each of them in turn (`--prompts` prompts of `--prompt-len` random tokens,
`--n` samples each, `--max-tokens` generated tokens, temperature 1, `ignore_eos`, the round's
seed), after one warm-up round that is not counted. The speedup of a scheme is the median over
rounds of (its tokens/s / the BF16 engine's tokens/s in the same round), so drift in a shared
machine's load cancels in pairs; min and max across rounds are kept too.

What quantization costs: the BF16 engine scores the tokens each quantized engine sampled in the
first timed round (prompt logprobs at temperature 1, the sampling temperature), and
`rl.mismatch.quantization_cost` reports KL(pi_quant || pi_bf16) (k1, unbiased because the
tokens come from pi_quant; and k3) and the mean and max per-token |logprob| gap.

Output: a table, and JSON (`--out`, default bench/results/rollout.json) with every round's
timings and the machine. Left out: GPU engines (the same code runs there; not measured), and
prefix caching effects (prompts are random, so no two share a prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from qerl_rollout.bench.models import (
    DEFAULT_MODELS_DIR,
    environment,
    model_dir,
    parameter_count,
    vllm_env_defaults,
    write_result,
)
from qerl_rollout.config import QUANT_SCHEMES, QuantConfig

DEFAULT_OUT = Path("bench/results/rollout.json")
SPEEDUP_TARGET = {"int8": 1.3}   # int8 vs BF16 at an RL batch on CPU (issue 9)


def rl_batch(prompts: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompt token ids, the same for every engine."""
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(prompt_len)] for _ in range(prompts)]


def timed_generate(engine, batch, args, seed: int) -> tuple[float, list]:
    """(tokens/s, samples) of one batch."""
    t0 = time.perf_counter()
    samples = engine.generate(batch, n=args.n, max_tokens=args.max_tokens, temperature=1.0,
                              seed=seed, ignore_eos=True)
    seconds = time.perf_counter() - t0
    return sum(len(s.token_ids) for s in samples) / seconds, samples


def quant_cost(bf16_engine, samples) -> dict:
    from qerl_rollout.rl.mismatch import quantization_cost

    ref = bf16_engine.score([s.prompt_token_ids for s in samples], [s.token_ids for s in samples])
    return quantization_cost([s.logprobs for s in samples], ref)


def start_engines(path: Path, schemes: list[str], max_model_len: int, **engine_options) -> dict:
    from qerl_rollout.rollout.engine import RolloutEngine, prepare_export

    engines = {}
    for scheme in schemes:
        t0 = time.perf_counter()
        quant = QuantConfig(scheme)
        engines[scheme] = RolloutEngine(path, quant, max_model_len=max_model_len,
                                        export_dir=prepare_export(path, quant), **engine_options)
        print(f"{scheme}: {engines[scheme].mode} engine started in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return engines


def run_rounds(engines: dict, batch, args) -> tuple[dict, dict]:
    """tokens/s per scheme per round, and the first timed round's samples per scheme."""
    rates = {s: [] for s in engines}
    first = {}
    for rnd in range(args.repeats + 1):          # round 0 warms up and is not counted
        for scheme, engine in engines.items():
            rate, samples = timed_generate(engine, batch, args, seed=1000 + rnd)
            if rnd:
                rates[scheme].append(rate)
                first.setdefault(scheme, samples)
            print(f"round {rnd}{' (warm-up)' if not rnd else ''}  {scheme:<11} {rate:8.0f} tok/s",
                  flush=True)
    return rates, first


def summarize(rates: dict, costs: dict) -> list[dict]:
    base = rates["bf16"]
    rows = []
    for scheme, r in rates.items():
        ratios = [a / b for a, b in zip(r, base)]
        rows.append({"scheme": scheme, "tokens_per_s": r, "median_tokens_per_s": statistics.median(r),
                     "speedup_vs_bf16": statistics.median(ratios), "speedup_min": min(ratios),
                     "speedup_max": max(ratios), "cost": costs.get(scheme),
                     "target": SPEEDUP_TARGET.get(scheme)})
    return rows


def format_table(rows: list[dict], modes: dict) -> str:
    lines = ["scheme      mode     tok/s (median, min-max)   speedup vs bf16 (min-max)   "
             "KL k1 / k3          |dlogp| mean / max"]
    for r in rows:
        tps = r["tokens_per_s"]
        c = r["cost"]
        cost = (f"{c['kl_k1']:.2e} / {c['kl_k3']:.2e}   {c['logp_gap_mean']:.4f} / {c['logp_gap_max']:.3f}"
                if c else "-")
        lines.append(f"{r['scheme']:<11} {modes[r['scheme']]:<8} {r['median_tokens_per_s']:7.0f} "
                     f"({min(tps):.0f}-{max(tps):.0f})        {r['speedup_vs_bf16']:5.2f}x "
                     f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f})          {cost}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m qerl_rollout.bench rollout",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default: the cached moe_430m)")
    p.add_argument("--schemes", nargs="+", choices=[s for s in QUANT_SCHEMES if s != "bf16"],
                   default=["int8"], help="quantized schemes to compare with bf16 (default: int8)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (plus one warm-up)")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE per engine")
    p.add_argument("--cpp-rmsnorm", action="store_true",
                   help="every engine runs vLLM-CPU's C++ RMSNorm instead of torch's (`rollout.cpu_rmsnorm=cpp`; "
                        "process-wide in vLLM, so compare two runs)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if min(args.prompts, args.prompt_len, args.n, args.max_tokens, args.repeats) < 1:
        p.error("--prompts, --prompt-len, --n, --max-tokens and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vllm_env_defaults(args.kv_cache_gib)
    t0 = time.perf_counter()
    path = args.model or model_dir("moe_430m", args.models_dir)
    if not (path / "config.json").is_file():
        raise SystemExit(f"error: {path} has no config.json")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    options = {"cpu_rmsnorm": "cpp" if args.cpp_rmsnorm else "torch"}
    engines = start_engines(path, ["bf16", *args.schemes], args.prompt_len + args.max_tokens + 8, **options)
    batch = rl_batch(args.prompts, args.prompt_len, vocab)
    rates, first = run_rounds(engines, batch, args)
    costs = {s: quant_cost(engines["bf16"], first[s]) for s in args.schemes}
    modes = {s: e.mode for s, e in engines.items()}
    for engine in engines.values():
        engine.close()
    rows = summarize(rates, costs)
    print("\n" + format_table(rows, modes))
    result = {"benchmark": "rollout", "environment": environment(), "model": str(path),
              "parameters": parameter_count(path), "modes": modes,
              "batch": {"prompts": args.prompts, "prompt_len": args.prompt_len, "n": args.n,
                        "max_tokens": args.max_tokens, "temperature": 1.0},
              "rmsnorm": options["cpu_rmsnorm"],
              "repeats": args.repeats, "wall_s": time.perf_counter() - t0, "rows": rows}
    write_result(args.out, result)
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s, load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
