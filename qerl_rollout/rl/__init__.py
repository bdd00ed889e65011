"""The learning side: GRPO math (`grpo`), mismatch correction (`mismatch`), AQN (`aqn`), and
the BF16 + LoRA policy (`policy`, which alone imports transformers and peft).

`grpo`, `mismatch` and `aqn` are pure torch and import neither ray nor vllm.
"""

from qerl_rollout.rl.aqn import AQNConfig, apply_aqn, aqn_sigma, aqn_stream
from qerl_rollout.rl.grpo import (
    GRPOConfig,
    aggregate,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_penalty,
    policy_loss,
)
from qerl_rollout.rl.mismatch import MismatchConfig, correct_mismatch

__all__ = [
    "AQNConfig", "GRPOConfig", "MismatchConfig", "aggregate", "apply_aqn", "aqn_sigma",
    "aqn_stream", "correct_mismatch", "entropy_from_logits", "group_advantages", "grpo_loss",
    "kl_penalty", "policy_loss",
]
