"""Held-out evaluation: the rollout engine's task reward on prompts training never samples.

How it works. `held_out_dataset` builds the eval prompts: `eval.prompts` (a jsonl/parquet file
of the task's format), or, for a synthetic task, its held-out split (`rows(split="eval")`:
prompts the training split never produces), from which any prompt text that also appears in
the training rows is removed all the same, so no eval prompt is ever trained on. `evaluate` generates `n` samples per prompt
from any rollout placement (`generate(prompt_ids, ...)`; greedy at temperature 0), scores them
with the task's reward, and returns `reward` (the mean over all samples: pass@1 in
expectation for 0/1 rewards) and, for n > 1, `pass@n` (the fraction of prompts with at least
one sample whose reward reaches `pass_threshold`). The run logs them as `eval/reward` and
`eval/pass@n`; with `eval.bf16` the same prompts also go through a BF16 engine pushed the same
policy: `eval/reward_bf16` and `eval/reward_gap` (BF16 minus quantized, what quantization
costs in accuracy). Left out: evaluation in a separate process while training goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EVAL_SEED_OFFSET = 1_000_003


@dataclass
class EvalConfig:
    """Held-out evaluation every `every` steps and at the end (0: off)."""

    every: int = 0
    prompts: str = ""              # jsonl/parquet of held-out prompts; "": the synthetic task's split
    num_prompts: int = 32
    n: int = 1                     # samples per prompt; n > 1 adds pass@n
    temperature: float = 0.0       # 0: greedy
    pass_threshold: float = 1.0    # a sample "passes" at reward >= this
    bf16: bool = False             # also evaluate a BF16 engine holding the same policy

    def __post_init__(self):
        if self.every < 0 or self.num_prompts < 1 or self.n < 1:
            raise ValueError(f"eval.every must be >= 0, eval.num_prompts and eval.n >= 1; got "
                             f"{self.every}, {self.num_prompts}, {self.n}")
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("eval.n > 1 needs eval.temperature > 0: greedy samples are all the same")


def held_out_dataset(cfg, tokenizer, data_cfg, train_rows: list[dict] | None):
    """The eval prompts (see the module docstring); `train_rows` are the synthetic training rows."""
    from dataclasses import replace

    from qerl_rollout.data.prompts import PromptDataset
    from qerl_rollout.rewards.synthetic import get_task

    e = cfg.eval
    if e.prompts:
        dataset = PromptDataset.from_file(replace(data_cfg, path=e.prompts), tokenizer)
        dataset.examples = dataset.examples[:e.num_prompts]
    elif cfg.task.synthetic:
        seen = {r["prompt"] for r in train_rows or []}
        rows = get_task(cfg.task.synthetic).rows(e.num_prompts, seed=cfg.run.seed + EVAL_SEED_OFFSET,
                                                 split="eval")
        rows = [r for r in rows if r["prompt"] not in seen][:e.num_prompts]
        dataset = PromptDataset(rows, tokenizer, data_cfg)
    else:
        raise ValueError("eval.every > 0 with task.path needs eval.prompts (a held-out file)")
    if not dataset.examples:
        raise ValueError("no held-out eval prompts left (all were skipped or seen in training)")
    return dataset


def evaluate(rollout, dataset, reward_fn, tokenizer, cfg: EvalConfig, *, max_tokens: int,
             stop_token_ids: list[int], seed: int, on_error: str = "zero") -> dict[str, float]:
    """The metrics of the module docstring, plus `reward_errors`: samples whose reward fn
    raised, scored 0 as in training (`on_error="raise"`, task.reward_errors, stops instead);
    non-finite rewards count as 0 too, so one bad sample cannot make the mean NaN."""
    examples = dataset.examples
    samples = rollout.generate([ex.prompt_ids for ex in examples], n=cfg.n, max_tokens=max_tokens,
                               temperature=cfg.temperature, stop_token_ids=stop_token_ids, seed=seed)
    per_prompt: list[list[float]] = [[] for _ in examples]
    errors = 0
    for s in samples:
        ex = examples[s.prompt_index]
        text = tokenizer.decode(s.token_ids, skip_special_tokens=True)
        try:
            value = float(reward_fn(ex.prompt, text, ex.answer))
        except Exception as e:
            if on_error == "raise":
                raise RuntimeError(f"the reward function failed on held-out prompt {ex.index}: "
                                   f"{type(e).__name__}: {e}") from e
            value, errors = 0.0, errors + 1
        per_prompt[s.prompt_index].append(value if math.isfinite(value) else 0.0)
    rewards = [r for rs in per_prompt for r in rs]
    out = {"reward": sum(rewards) / len(rewards), "reward_errors": errors}
    if cfg.n > 1:
        passed = [max(rs) >= cfg.pass_threshold for rs in per_prompt]
        out[f"pass@{cfg.n}"] = sum(passed) / len(passed)
    return out
