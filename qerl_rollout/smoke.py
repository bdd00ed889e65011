"""`python -m qerl_rollout.smoke`: one rollout -> train-step -> push cycle on a tiny local MoE.

Builds a tiny random Qwen3-MoE and its tokenizer locally (no downloads), starts the rollout
engine on it with a quantized scheme (emulate mode on CPU), samples n responses per prompt
with their logprobs, changes the policy's LoRA adapters as an optimizer step would, streams
the new weights into the engine and samples again. It prints what each stage did and what it
cost. This is the embedded CPU default until the training entry point lands.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from qerl_rollout.quant import DEFAULT_SCHEME
from qerl_rollout.rollout.types import QUANT_SCHEMES


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m qerl_rollout.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default=DEFAULT_SCHEME, choices=QUANT_SCHEMES)
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "qwen2_moe", "mixtral"])
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--workdir", default=None, help="where the tiny model is written (default: a temp dir)")
    return p.parse_args(argv)


def _show(tag, samples, tokenizer):
    for s in samples[:2]:
        text = tokenizer.decode(s.token_ids).replace("\n", " ")
        mean_lp = sum(s.logprobs) / max(len(s.logprobs), 1)
        print(f"  [{tag}] prompt {s.prompt_index} v{s.version}: {text[:60]!r} (mean logprob {mean_lp:.3f})")


def main(argv=None) -> int:
    args = parse_args(argv)
    from qerl_rollout.rollout.engine import set_engine_env

    set_engine_env(1)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qerl_rollout import QuantConfig, RolloutEngine, WeightSync
    from qerl_rollout.rollout.engine import prepare_export
    from qerl_rollout.tiny import build_tiny_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qerl-smoke-"))
    t0 = time.perf_counter()
    model_dir = build_tiny_model(args.family, workdir / args.family)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    print(f"built tiny {args.family} in {model_dir} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    quant = QuantConfig(args.scheme)
    engine = RolloutEngine(model_dir, quant, export_dir=prepare_export(model_dir, quant))
    print(f"engine ready: scheme={engine.scheme} mode={engine.mode} ({time.perf_counter() - t0:.1f} s)")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True)
             for q in ("What is 12 + 7?", "Write a short poem about the sea.")]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    samples = engine.generate(prompts, n=args.n, max_tokens=args.max_tokens, seed=0)
    print(f"generated {len(samples)} samples ({args.n} per prompt)")
    _show("before", samples, tokenizer)

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16),
                            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    sync = WeightSync(engine)
    first = sync.push(policy)
    with torch.no_grad():   # stand-in for an optimizer step on the adapters
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    delta = sync.push(policy)
    for tag, r in (("full push", first), ("delta push", delta)):
        print(f"{tag}: v{r.version}, {r.tensors_sent} tensors, {r.bytes_sent / 1e6:.2f} MB on the wire "
              f"({r.wire_ratio:.2f}x BF16), {r.seconds['total'] * 1e3:.0f} ms")
    _show("after", engine.generate(prompts, n=args.n, max_tokens=args.max_tokens, seed=0), tokenizer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
