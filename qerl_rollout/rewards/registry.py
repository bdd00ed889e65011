"""Reward lookup by name: built-ins, user registrations, and "module:function" imports.

`get_reward("math")` returns a built-in; `get_reward("my_pkg.rewards:score")` imports
`my_pkg.rewards` and returns its `score` (which must follow the common signature, see
`qerl_rollout.rewards`). `register_reward("name")` adds a function under a name.
`weighted_reward({"math": 1.0, "boxed_format": 0.1})` sums several. Left out: async or batched
reward servers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from qerl_rollout.rewards.format import (
    boxed_format_reward,
    gsm8k_format_reward,
    think_format_reward,
)
from qerl_rollout.rewards.math import math_reward
from qerl_rollout.rewards.synthetic import TASKS

RewardFn = Callable[..., float]

_REGISTRY: dict[str, RewardFn] = {
    "math": math_reward,
    "boxed_format": boxed_format_reward,
    "gsm8k_format": gsm8k_format_reward,
    "think_format": think_format_reward,
    **{name: task.reward for name, task in TASKS.items()},
}


def register_reward(name: str):
    """Decorator: make `fn` available as `get_reward(name)`; a taken name is an error."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def import_reward(spec: str) -> RewardFn:
    """"package.module:function" -> the function (attribute paths like "mod:Cls.method" work)."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward spec {spec!r} is not 'module:function'")
    target = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    if not callable(target):
        raise TypeError(f"{spec!r} is not callable")
    return target


def get_reward(spec: str) -> RewardFn:
    """A registered name, or "module:function"."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        return import_reward(spec)
    raise KeyError(f"unknown reward {spec!r}; registered: {reward_names()}, or use 'module:function'")


def weighted_reward(weights: dict[str, float]) -> RewardFn:
    """sum_i w_i * get_reward(spec_i)(...), resolved once."""
    parts = [(get_reward(spec), w) for spec, w in weights.items()]

    def combined(prompt: str, response: str, answer: str | None = None, **meta) -> float:
        return sum(w * fn(prompt, response, answer, **meta) for fn, w in parts)

    return combined
