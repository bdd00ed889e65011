"""GRPO on a tiny random MoE, on a CPU: the whole controller loop in one process.

    python examples/grpo_tiny_cpu.py --steps 40 --scheme fp8_block --task digits

How it works. A tiny random Qwen3-MoE is built locally (`qerl_rollout.tiny`). The trainer holds
it in BF16 with LoRA adapters (`rl.policy.Policy`); the rollout engine (`RolloutEngine`, vLLM
in-process) serves a quantized copy (emulate mode on CPU: BF16 layers holding the
quantize-dequantize values); `WeightSync` merges LoRA, requantizes and streams the changed
layers into the engine after every optimizer step. One step (`run`):

    prompts -> engine.generate(n=group)       samples with rollout logprobs, version v
            -> task reward per sample          (decoded text, special tokens dropped)
            -> group_advantages                (r - mean_g) / std_g
            -> policy.train_step               GRPO loss with token-level TIS against the
                                               rollout logprobs: min(pi_old / pi_rollout, 2)
            -> sync.push(policy.model)         the engine serves version v + 1

Every step prints the mean reward, the loss, the rollout/trainer mismatch (KL k3 and the
importance weights), what the push moved and what each phase cost; `--out` writes the curve as
JSON. `run(args)` returns the same records, so tests drive the loop without a subprocess.

Why LoRA on `lm_head` (on by default). The tiny model's `lm_head` rows are N(0, 0.02) and the
final RMSNorm fixes the hidden state's norm at sqrt(256), so with a frozen `lm_head` no hidden
state can put more than ~44% of the next-token probability on digit tokens (the `digits`
reward starts at ~0.4). LoRA on attention (and experts) alone therefore cannot raise that
reward; with LoRA on `lm_head` it reaches ~1.0 in 15-25 steps. The weight sync handles it as
any LoRA Linear: merged in fp32, sent in BF16 (lm_head is never quantized).

Left out: Ray placement, checkpoints, held-out evaluation, a KL penalty to the base model,
and wandb.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# vLLM in-process (its weight reload needs it) and a small KV cache; set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM warns "Failed to load weights" for every layer a partial push leaves untouched.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--scheme", default="fp8_block",
                   choices=["bf16", "fp8_block", "fp8_channel", "nvfp4"])
    p.add_argument("--task", default="digits", choices=["digits", "digit_count"])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--group", type=int, default=8, help="responses per prompt (GRPO group size)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; the trainer scores at the same temperature")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-experts", action=argparse.BooleanOptionalAction, default=False,
                   help="also put LoRA on the fused MoE experts (target_parameters)")
    p.add_argument("--lora-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="also put LoRA on lm_head (the module docstring says why it matters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None,
                   help="tiny Qwen3-MoE checkpoint; built there (seeded by --seed) if it has no "
                        "config.json (default: a new temp dir)")
    p.add_argument("--out", default=None, help="write the curve here as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    return p.parse_args(argv)


@dataclass
class Prompt:
    text: str            # as the task wrote it (what the reward sees)
    ids: list[int]       # chat-templated token ids (what the engine sees)
    answer: str | None


def build(args):
    """Tiny model -> (tokenizer, prompts, reward fn, Policy, RolloutEngine, WeightSync)."""
    from transformers import AutoTokenizer

    from qerl_rollout import QuantConfig, RolloutEngine, WeightSync
    from qerl_rollout.data.prompts import PromptDataConfig, encode_prompt
    from qerl_rollout.rewards.synthetic import get_task
    from qerl_rollout.rl import GRPOConfig, MismatchConfig
    from qerl_rollout.rl.policy import ATTENTION_PROJECTIONS, Policy, PolicyConfig
    from qerl_rollout.tiny import build_tiny_model

    model_dir = Path(args.model_dir or Path(tempfile.mkdtemp(prefix="qerl-grpo-")) / "qwen3_moe")
    if not (model_dir / "config.json").exists():
        build_tiny_model("qwen3_moe", model_dir, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    task = get_task(args.task)
    prompts = [Prompt(r["prompt"], encode_prompt(r["prompt"], tokenizer, PromptDataConfig()),
                      r["answer"]) for r in task.rows(256, seed=args.seed)]
    lm_head = ("lm_head",) if args.lora_lm_head else ()
    policy = Policy(
        PolicyConfig(model_path=str(model_dir), device="cpu", lora_rank=args.lora_rank,
                     lora_alpha=2 * args.lora_rank, lr=args.lr, total_steps=args.steps,
                     target_modules=ATTENTION_PROJECTIONS + lm_head,
                     target_parameters=EXPERTS if args.lora_experts else (),
                     micro_batch_size=args.group * args.prompts_per_step, seed=args.seed,
                     temperature=args.temperature),
        GRPOConfig(group_size=args.group), MismatchConfig(level="token", cap=2.0))
    engine = RolloutEngine(model_dir, QuantConfig(args.scheme), seed=args.seed, max_model_len=256)
    return tokenizer, prompts, task.reward, policy, engine, WeightSync(engine)


def run(args: argparse.Namespace) -> list[dict]:
    """The controller loop; returns one record per step."""
    from qerl_rollout.rl import group_advantages
    from qerl_rollout.rl.policy import TokenBatch

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer, prompts, reward_fn, policy, engine, sync = build(args)
    curve = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        chosen = rng.sample(prompts, args.prompts_per_step)
        samples = engine.generate([p.ids for p in chosen], n=args.group,
                                  max_tokens=args.max_tokens, temperature=args.temperature,
                                  seed=args.seed * 100_003 + step,
                                  stop_token_ids=[tokenizer.eos_token_id])
        t1 = time.perf_counter()
        rewards = score(samples, chosen, reward_fn, tokenizer)
        advantages = group_advantages(rewards, args.group)
        batch, logp_rollout = TokenBatch.from_samples(samples, tokenizer.pad_token_id)
        metrics = policy.train_step(batch, advantages, logp_rollout=logp_rollout)
        t2 = time.perf_counter()
        report = sync.push(policy.model)
        times = {"rollout_s": t1 - t0, "train_s": t2 - t1, "step_s": time.perf_counter() - t0}
        curve.append(record(step, rewards, metrics, report, samples, times, tokenizer))
        if not args.quiet:
            print_step(curve[-1])
    engine.close()
    return curve


def score(samples, chosen: list[Prompt], reward_fn, tokenizer) -> torch.Tensor:
    """(B,) task rewards of the decoded responses (special tokens such as eos dropped)."""
    return torch.tensor([
        reward_fn(chosen[s.prompt_index].text,
                  tokenizer.decode(s.token_ids, skip_special_tokens=True),
                  chosen[s.prompt_index].answer)
        for s in samples])


def record(step, rewards, metrics, report, samples, times, tokenizer) -> dict:
    """One step of the curve: reward, loss, mismatch / IS metrics, push, versions, timings."""
    keep = ("loss", "grad_norm", "mismatch_kl_k3", "is_weight_mean", "is_clipped_frac", "is_ess")
    return {
        "step": step, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
        **{k: metrics[k] for k in keep},
        "response_len": sum(len(s.token_ids) for s in samples) / len(samples),
        "sample_versions": sorted({s.version for s in samples}),
        "pushed_version": report.version,
        "push_mb": report.bytes_sent / 1e6, "push_s": report.seconds["total"], **times,
        "example": tokenizer.decode(samples[0].token_ids, skip_special_tokens=True),
    }


def print_step(r: dict) -> None:
    print(f"step {r['step']:3d}  reward {r['reward_mean']:.3f}  loss {r['loss']:+.4f}  "
          f"mismatch_kl {r['mismatch_kl_k3']:.2e}  is_w {r['is_weight_mean']:.3f} "
          f"clip {r['is_clipped_frac']:.3f} ess {r['is_ess']:.3f}  "
          f"push v{r['pushed_version']} {r['push_mb']:.2f} MB {r['push_s']:.2f} s  "
          f"rollout {r['rollout_s']:.2f} s  train {r['train_s']:.2f} s  {r['example']!r}",
          flush=True)


def summarize(curve: list[dict], window: int = 5) -> dict:
    """Mean reward over the first and last `window` steps, and the seconds spent in the loop."""
    first = [r["reward_mean"] for r in curve[:window]]
    last = [r["reward_mean"] for r in curve[-window:]]
    return {"steps": len(curve), "reward_first": sum(first) / len(first),
            "reward_last": sum(last) / len(last), "loop_seconds": sum(r["step_s"] for r in curve)}


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    curve = run(args)
    summary = {**summarize(curve), "wall_seconds": time.perf_counter() - t0, "args": vars(args)}
    print(f"reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f} "
          f"(mean of first/last 5 steps) in {summary['steps']} steps, "
          f"{summary['loop_seconds']:.0f} s in the loop, {summary['wall_seconds']:.0f} s in all")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "curve": curve}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
