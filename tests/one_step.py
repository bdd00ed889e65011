"""The single-process GRPO step that sharded steps are compared with, and the comparison.

A sharded step does the forward of every row with the same BF16 arithmetic on the same
gathered weights; what differs is the order in which fp32 gradients are summed (per-rank
partial sums, reduce-scattered). Measured: gradients differ by ~3e-7 of their largest entry.
AdamW's first step moves each weight by lr * g / (|g| + eps), about lr * sign(g), so updated
weights are compared against the bound that step puts on a gradient error of DELTA (1e-6 of
the largest entry), entry by entry, wherever |g| is clear of that error (entries within it
may flip the sign of their update); those entries must be almost all of them (> 99%).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qerl_rollout.rl.grpo import GRPOConfig
from qerl_rollout.rl.mismatch import MismatchConfig
from qerl_rollout.rl.policy import Policy, PolicyConfig, TokenBatch

LR = 1e-2
ADAM_EPS = 1e-8                  # torch.optim.AdamW's default, which Policy uses
DELTA = 1e-6                     # gradient error bound, relative to the largest entry (measured ~3e-7)
GRPO = GRPOConfig(group_size=4, horizon=8)


def policy_config(model_dir, micro_batch_size: int = 64) -> PolicyConfig:
    return PolicyConfig(model_path=str(model_dir), device="cpu", lora_rank=8, lora_alpha=16, lr=LR,
                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "lm_head"),
                        micro_batch_size=micro_batch_size)


def batch(rows: int = 16, order: list[int] | None = None) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """Seeded random prompts and responses of mixed lengths, advantages and rollout logprobs;
    `order` permutes the rows (the padded widths stay those of the whole set)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (5 + i % 3,), generator=g).tolist() for i in range(rows)]
    responses = [torch.randint(3, 500, (4 + i % 5,), generator=g).tolist() for i in range(rows)]
    mask = TokenBatch.from_token_lists(prompts, responses, 0).response_mask
    logp_rollout = -torch.rand(mask.shape, generator=g) * mask
    advantages = torch.randn(rows, generator=g)
    order = list(range(rows)) if order is None else order
    tokens = TokenBatch.from_token_lists([prompts[i] for i in order], [responses[i] for i in order], 0)
    return tokens, advantages[order], logp_rollout[order]


def rule_routes(tokens: TokenBatch, layers: int, k: int, experts: int) -> TokenBatch:
    """`tokens` with rollout routes that follow a rule of the token ids alone (so every rank
    derives its rows' share): expert (3 x + layer + j) mod E for j < k, -1 on padding."""
    j = torch.arange(k).view(1, 1, 1, k)
    layer = torch.arange(layers).view(1, 1, layers, 1)
    routes = (3 * tokens.input_ids.view(*tokens.input_ids.shape, 1, 1) + layer + j) % experts
    routes[tokens.attention_mask == 0] = -1
    return replace(tokens, routes=routes.to(torch.int16))


def policy_routes(policy: Policy, tokens: TokenBatch) -> TokenBatch:
    hooks = policy.routing
    return rule_routes(tokens, len(hooks.names), hooks.top_k, hooks.num_experts)


def single_step(model_dir, rows: int = 16, micro_batch_size: int = 64, order: list[int] | None = None,
                replay: str = "none"):
    """(metrics, gradients, LoRA after the step) of one unsharded step on `batch(rows, order)`;
    `replay="r3"` replays `rule_routes`."""
    tokens, advantages, logp_rollout = batch(rows, order)
    policy = Policy(replace(policy_config(model_dir, micro_batch_size), routing_replay=replay), GRPO,
                    MismatchConfig())
    if replay != "none":
        tokens = policy_routes(policy, tokens)
    metrics = policy.backward(tokens, advantages, logp_rollout)
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    metrics.update(policy.optimizer_step())
    return metrics, grads, policy.lora_tensors()


def assert_same_adamw_step(grads: dict, single: dict, sharded: dict) -> None:
    """`sharded` LoRA equals `single` within what DELTA of gradient error allows AdamW's step."""
    assert single.keys() == sharded.keys()
    compared = nonzero = 0
    for name, g in grads.items():
        # AdamW's first step is -lr * g / (|g| + eps): its change for a gradient error d is at
        # most lr * eps * d / (|g| - d)^2, with d <= DELTA * max|g|; below 2d a sign may flip.
        d = DELTA * g.abs().max()
        clear = g.abs() > 2 * d
        bound = LR * ADAM_EPS * d / (g.abs() - d).clamp(min=1e-30) ** 2 + 1e-7
        excess = ((single[name] - sharded[name]).abs() - bound)[clear]
        assert excess.numel() == 0 or excess.max() <= 0, name
        compared, nonzero = compared + int(clear.sum()), nonzero + int((g != 0).sum())
    assert compared > 0.99 * nonzero   # lora_A's gradients are exactly 0 at step 1 (B starts at 0)
