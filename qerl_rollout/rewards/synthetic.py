"""Synthetic tasks that a random tiny model can learn with RL on a CPU in minutes.

A randomly initialized model samples tokens almost uniformly, so a task only moves if random
samples already earn *some* reward and better samples earn more (dense partial credit). An
"echo the first prompt token" task gave a random tiny MoE no signal in 400 steps; an "emit
token 7" task rose from 0.016 to 0.16. The tasks here give partial credit on every sample:

- "digits": reward = fraction of the response's non-space characters that are digits. About a
  third of the tiny BPE vocabulary is digit tokens, so a random model starts near 0.35 and
  the ceiling is 1.0. It rises clearly (0.41 -> 1.00 in 10 GRPO steps, examples/) only when
  the output layer can move: with a frozen N(0, 0.02) lm_head behind the final RMSNorm, no
  hidden state puts more than ~44% of the probability on digit tokens, so LoRA on attention
  and experts alone plateaus near the start. Put LoRA on lm_head too (the weight sync sends
  it in BF16). The embedded CPU default.
- "digit_count": the prompt asks for n digits (answer n, 3..8); reward =
  max(0, 1 - |digits - n| / n), so any digit-bearing sample scores and n must be read.

Each task has a prompt generator (`rows(n, seed)` -> dataset rows {"prompt", "answer"}), a
held-out one (`rows(n, seed, split="eval")`: prompts the training split never produces: other
subjects for "digits", another phrasing for "digit_count") and a
reward with the common signature (see `qerl_rollout.rewards`). They work on decoded text, so
they do not depend on one tokenizer. Left out: tasks that need reasoning; use `math` for that.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

_SUBJECTS = ("numbers", "digits", "a code", "a count", "a sequence", "a total")
_EVAL_SUBJECTS = ("a year", "a phone number", "a price", "a score")   # never in training


def digit_fraction(text: str) -> float:
    """Fraction of the non-whitespace characters of `text` that are digits (0.0 if none)."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def digits_reward(prompt: str, response: str, answer: str | None = None, **meta) -> float:
    """Dense reward for writing only digits: the response's digit fraction."""
    return digit_fraction(response)


def digit_count_reward(prompt: str, response: str, answer: str | None, **meta) -> float:
    """max(0, 1 - |#digits - n| / n) with n = int(answer)."""
    target = int(answer)
    count = sum(c.isdigit() for c in response)
    return max(0.0, 1.0 - abs(count - target) / target)


def _digits_row(rng: random.Random) -> dict:
    return {"prompt": f"Write {rng.choice(_SUBJECTS)} using only digits.", "answer": None}


def _digit_count_row(rng: random.Random) -> dict:
    n = rng.randint(3, 8)
    return {"prompt": f"Write exactly {n} digits.", "answer": str(n)}


def _digits_eval_row(rng: random.Random) -> dict:
    return {"prompt": f"Write {rng.choice(_EVAL_SUBJECTS)} using only digits.", "answer": None}


def _digit_count_eval_row(rng: random.Random) -> dict:
    n = rng.randint(3, 8)
    return {"prompt": f"Give me {n} digits and nothing else.", "answer": str(n)}


@dataclass(frozen=True)
class SyntheticTask:
    """A named toy task: a row generator and its reward."""

    name: str
    make_row: Callable[[random.Random], dict]
    reward: Callable[..., float]
    make_eval_row: Callable[[random.Random], dict]

    def rows(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        """`n` dataset rows {"prompt": str, "answer": str | None}, deterministic in `seed`;
        `split="eval"` draws from prompts the training split never produces."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(seed)
        make = self.make_row if split == "train" else self.make_eval_row
        return [make(rng) for _ in range(n)]


TASKS: dict[str, SyntheticTask] = {
    "digits": SyntheticTask("digits", _digits_row, digits_reward, _digits_eval_row),
    "digit_count": SyntheticTask("digit_count", _digit_count_row, digit_count_reward,
                                 _digit_count_eval_row),
}


def get_task(name: str) -> SyntheticTask:
    if name not in TASKS:
        raise KeyError(f"unknown synthetic task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]
