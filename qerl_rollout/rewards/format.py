"""Format rewards: does the response state its answer the way the prompt asked?

They ignore correctness (pair them with `math_reward` through the registry's weighted sum).
Each returns 1.0 or 0.0. Left out: graded partial credit for near-misses.
"""

from __future__ import annotations

import re

from qerl_rollout.rewards.math import gsm8k_answer, last_boxed

_THINK = re.compile(r"^\s*<think>.*?</think>\s*\S", re.DOTALL)


def boxed_format_reward(prompt: str, response: str, answer: str | None = None, **meta) -> float:
    """1.0 if the response contains a non-empty \\boxed{...}."""
    content = last_boxed(response)
    return 1.0 if content and content.strip() else 0.0


def gsm8k_format_reward(prompt: str, response: str, answer: str | None = None, **meta) -> float:
    """1.0 if the response has a "#### value" final-answer line."""
    return 1.0 if gsm8k_answer(response) else 0.0


def think_format_reward(prompt: str, response: str, answer: str | None = None, **meta) -> float:
    """1.0 if the response opens with <think>...</think> and then says something."""
    return 1.0 if _THINK.match(response) else 0.0
