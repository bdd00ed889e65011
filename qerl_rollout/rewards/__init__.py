"""Reward functions. One signature for all of them:

    fn(prompt: str, response: str, answer: str | None, **meta) -> float

`prompt` is the prompt text as the dataset gave it (before the chat template), `response` the
decoded completion, `answer` the dataset's reference (None when there is none). `meta` carries
anything else the caller has (e.g. `response_ids`, the row's extra fields); functions must
accept and ignore keys they do not use. Rewards are plain floats, usually in [0, 1].

- `math`: final-answer correctness with math-verify (GSM8K "#### 42" and \\boxed{} answers).
- `format`: format-only rewards (boxed answer present, GSM8K "####" line present).
- `synthetic`: toy tasks a random tiny model can learn on a CPU, each with a prompt generator.
- `registry`: names -> functions, plus "module:function" for user code.
"""

from qerl_rollout.rewards.registry import get_reward, register_reward, reward_names, weighted_reward

__all__ = ["get_reward", "register_reward", "reward_names", "weighted_reward"]
