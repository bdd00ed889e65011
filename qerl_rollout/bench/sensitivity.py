"""`python -m qerl_rollout.bench sensitivity`: which layers quantization hurts, and what to keep BF16.

How it works. The checkpoint (`--model DIR`, or the cached synthetic `--size`) is loaded in BF16
with transformers and scores one fixed batch (`--rows` x `--tokens` seeded random token ids):
the BF16 log-probabilities over the vocabulary at every position and each router's top-k are
the reference. Every quantized tensor of the plan gets its quantize-dequantize values once
(`wire.stream.qdq_named_tensors`, the numbers an emulate engine serves). Then each variant swaps
the QDQ values in for a subset of tensors, scores the same batch, and swaps the BF16 ones back:

- one decoder layer at a time (`layer <i>`), one module kind at a time (`kind <category>`);
- what `rollout.quant_targets` and `rollout.bf16_layers` would serve (`targets <t>`, `bf16_layers
  <N>`; `quant.plan.Precision`), the last being all of it (`bf16_layers 0`);
- each `--recipe kind=scheme[,kind=scheme]`: all of it with those `rollout.quant_overrides`
  (`recipe experts=nvfp4`), whose QDQ values come from that mixed plan.

For each: KL(pi_quant || pi_bf16) per token (exact over the vocabulary, mean over positions) and
the router flip rate (the fraction of (token, MoE layer) whose k experts differ from BF16's). The
table ranks the layers; `suggest` names the broadest targets and the fewest BF16 layers whose KL
stays within `--kl-budget`. Output: the table, JSON (`--out`, default
bench/results/sensitivity.json) and a bar plot of the per-layer KL beside it.

Left out: activation quantization (INT8 W8A8's per-token activations; the weights alone are
measured), real text (the batch is random ids, so on a random-weight model the figures rank
layers but do not predict a trained model's), and combinations other than the ones listed.
"""

from __future__ import annotations

import argparse
import re
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
from qerl_rollout.quant import DEFAULT_SCHEME, SCHEMES
from qerl_rollout.quant.plan import QUANT_TARGETS, Precision, build_plan

DEFAULT_OUT = Path("bench/results/sensitivity.json")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _layer(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@torch.no_grad()
def _score(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positions, vocab) fp32 log-probs and (positions, layers, k) router top-k (None if dense)."""
    from qerl_rollout.rl.routing import recorded_routes

    with recorded_routes(model) as seen:
        logits = model(input_ids=input_ids).logits.float()
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    routes = torch.stack([t.reshape(-1, t.shape[-1]) for t in seen.values()], dim=1) if seen else None
    return logp, routes


def _compare(reference, variant) -> tuple[float, float | None]:
    """(mean KL(variant || reference) per position, router flip rate or None)."""
    (lb, rb), (lq, rq) = reference, variant
    kl = (lq.exp() * (lq - lb)).sum(-1).mean().item()
    if rb is None:
        return kl, None
    flips = (rb.sort(-1).values != rq.sort(-1).values).any(-1).float().mean().item()
    return kl, flips


def variants(plan, num_layers: int) -> dict[str, set[str]]:
    """Variant name -> the quantized trainer tensors it swaps in (module docstring)."""
    quantized = {d.name: d for d in plan.quantized()}
    out = {f"layer {i}": {n for n in quantized if _layer(n) == i} for i in range(num_layers)}
    for kind in sorted({d.category for d in quantized.values()}):
        out[f"kind {kind}"] = {n for n, d in quantized.items() if d.category == kind}
    for targets in QUANT_TARGETS:
        out[f"targets {targets}"] = {n for n, d in quantized.items() if d.category in QUANT_TARGETS[targets]}
    for n_bf16 in range((num_layers - 1) // 2 + 1):
        precision = Precision(bf16_layers=n_bf16)
        out[f"bf16_layers {n_bf16}"] = {n for n, d in quantized.items()
                                        if not precision.kept_bf16(d.category, _layer(n), num_layers)}
    return {k: v for k, v in out.items() if v}


def parse_recipe(text: str) -> tuple[tuple[str, str], ...]:
    """`experts=nvfp4,attention=fp8_block` -> quant_overrides pairs (checked by `Precision`)."""
    pairs = tuple(tuple(part.split("=", 1)) for part in text.split(",") if part)
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"--recipe {text!r}: expected kind=scheme[,kind=scheme]")
    Precision(overrides=pairs)
    return pairs


def _qdq(model, params: dict, scheme: str, precision: Precision | None = None) -> dict[str, torch.Tensor]:
    """The QDQ values of every tensor the plan of `scheme` (and `precision`) quantizes."""
    from qerl_rollout.wire.stream import qdq_named_tensors

    plan = build_plan(model.config, scheme, precision)
    return {n: t for n, t in qdq_named_tensors(plan, scheme, ((n, p.detach()) for n, p in params.items()))
            if plan.decisions[n].quantized}


def _swapped_score(model, params: dict, values: dict[str, torch.Tensor], input_ids):
    """`_score` with `values` in place of those parameters, which are restored exactly after."""
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, t in values.items():
                params[n].copy_(t)
        return _score(model, input_ids)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


def sensitivity(model, scheme: str, input_ids: torch.Tensor, recipes: tuple[str, ...] = ()) -> list[dict]:
    """One row per variant (and per recipe): its name, tensors swapped in, KL and flip rate."""
    plan = build_plan(model.config, scheme)
    params = dict(model.named_parameters())
    qdq = _qdq(model, params, scheme)
    reference = _score(model, input_ids)
    rows = []
    for name, tensors in variants(plan, model.config.get_text_config().num_hidden_layers).items():
        kl, flips = _compare(reference, _swapped_score(model, params, {n: qdq[n] for n in tensors}, input_ids))
        rows.append({"variant": name, "tensors": len(tensors), "kl": kl, "flip_rate": flips})
    for recipe in recipes:
        values = _qdq(model, params, scheme, Precision(overrides=parse_recipe(recipe)))
        kl, flips = _compare(reference, _swapped_score(model, params, values, input_ids))
        rows.append({"variant": f"recipe {recipe}", "tensors": len(values), "kl": kl, "flip_rate": flips})
    return rows


def suggest(rows: list[dict], budget: float) -> list[str]:
    """The broadest `quant_targets` and the fewest `bf16_layers` whose KL is within `budget`."""
    kl = {r["variant"]: r["kl"] for r in rows}
    lines = []
    fitting = [t for t in reversed(list(QUANT_TARGETS)) if kl.get(f"targets {t}", float("inf")) <= budget]
    lines.append(f"rollout.quant_targets={fitting[0]}" if fitting else
                 f"no quant_targets keeps KL <= {budget:g} (experts alone: {kl.get('targets experts', float('nan')):.3g})")
    layers = sorted((int(v.split()[1]), k) for v, k in kl.items() if v.startswith("bf16_layers "))
    within = [n for n, k in layers if k <= budget]
    lines.append(f"rollout.bf16_layers={within[0]} (with all_linear)" if within else
                 f"no bf16_layers up to {layers[-1][0]} keeps all_linear within {budget:g}")
    return lines


def _table(rows: list[dict]) -> str:
    width = max([28] + [len(r["variant"]) + 2 for r in rows])
    out = [f"{'variant':<{width}}{'tensors':>8}{'KL(q || bf16)':>16}{'router flips':>14}"]
    layer_rows = sorted((r for r in rows if r["variant"].startswith("layer ")), key=lambda r: -r["kl"])
    for r in layer_rows + [r for r in rows if not r["variant"].startswith("layer ")]:
        flips = "-" if r["flip_rate"] is None else f"{r['flip_rate']:.4f}"
        out.append(f"{r['variant']:<{width}}{r['tensors']:>8}{r['kl']:>16.3e}{flips:>14}")
    return "\n".join(out)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r for r in rows if r["variant"].startswith("layer ")]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.4), 4))
    ax.bar([r["variant"].split()[1] for r in layers], [r["kl"] for r in layers])
    ax.set_xlabel("decoder layer quantized alone")
    ax.set_ylabel("KL(pi_quant || pi_bf16) per token")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m qerl_rollout.bench sensitivity",
                                description="Which layers quantization hurts (module docstring).")
    p.add_argument("--model", type=Path, help="checkpoint dir (default: the cached --size model)")
    p.add_argument("--size", choices=sorted(MODELS), default="moe_430m")
    p.add_argument("--scheme", choices=sorted(SCHEMES), default=DEFAULT_SCHEME)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--kl-budget", type=float, default=1e-3)
    p.add_argument("--recipe", action="append", default=[], metavar="KIND=SCHEME[,KIND=SCHEME]",
                   help="also measure all of it with these rollout.quant_overrides (repeatable)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    args = _args(argv)
    path = args.model or model_dir(args.size, args.models_dir)
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"error: {path} has no config.json")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (args.rows, args.tokens), generator=g)
    try:
        for recipe in args.recipe:
            parse_recipe(recipe)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    rows = sensitivity(model, args.scheme, ids, tuple(args.recipe))
    print(_table(rows))
    advice = suggest(rows, args.kl_budget)
    print(f"\nwithin KL {args.kl_budget:g}: " + "; ".join(advice))
    write_result(args.out, {"benchmark": "sensitivity", "environment": environment(), "model": str(path),
                            "scheme": args.scheme, "recipes": args.recipe, "rows": args.rows, "tokens": args.tokens,
                            "kl_budget": args.kl_budget, "suggest": advice, "variants": rows,
                            "wall_s": time.perf_counter() - started})
    _plot(rows, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
