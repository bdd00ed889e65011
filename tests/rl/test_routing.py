"""The trainer's expert load (`rl.routing`): counted from its own training forward, exactly.

- `load_metrics` against hand-derived figures.
- A `Policy.backward` counts each real token's k experts once per MoE layer: the counts equal a
  bincount of the router outputs of the same forward, masked by hand; padding never counts
  (the batch pads 16 rows to 12 + 8 columns); the no-grad scoring passes (logp_old, the
  KL reference) add nothing; gradient checkpointing's recompute adds nothing (the same counts
  as without it).
- Sharded ranks report the single-process figures: tests/rl/test_uneven_ranks.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from one_step import GRPO, batch, policy_config

from qerl_rollout.rl.grpo import GRPOConfig
from qerl_rollout.rl.mismatch import MismatchConfig
from qerl_rollout.rl.policy import Policy
from qerl_rollout.rl.routing import (
    RouterHooks,
    _layer_label,
    load_metrics,
    recorded_routes,
    router_modules,
)

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe"]


def test_load_metrics_by_hand():
    counts = torch.tensor([[4, 0, 2, 2], [2, 2, 2, 2]])
    m = load_metrics(counts, ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"], "experts/x")
    # layer 0: mean 2, population std sqrt((4 + 4 + 0 + 0) / 4) = sqrt(2); busiest 4 = 2 x mean
    assert m["experts/x/load_cv/layer0"] == pytest.approx(math.sqrt(2) / 2, abs=1e-12)
    assert (m["experts/x/max_over_mean/layer0"], m["experts/x/dead/layer0"]) == (2.0, 1.0)
    assert (m["experts/x/load_cv/layer1"], m["experts/x/max_over_mean/layer1"], m["experts/x/dead/layer1"]) == (0.0, 1.0, 0.0)
    assert m["experts/x/load_cv"] == pytest.approx(math.sqrt(2) / 4, abs=1e-12)
    assert (m["experts/x/max_over_mean"], m["experts/x/dead"]) == (1.5, 1.0)
    empty = load_metrics(torch.zeros(1, 4, dtype=torch.int64), ["model.layers.0.mlp.gate"], "e")
    assert (empty["e/load_cv"], empty["e/max_over_mean"], empty["e/dead"]) == (0.0, 0.0, 4.0)


def _routes_by_hand(policy: Policy, tokens) -> torch.Tensor:
    """(layers, experts) counts of one eval-free forward of `tokens`, hooked and masked here."""
    routers = router_modules(policy.model)
    with recorded_routes(policy.model) as seen, torch.no_grad():
        policy._forward(tokens)
    real = tokens.attention_mask.reshape(-1).bool()
    experts = policy.routing.counts.shape[1]
    return torch.stack([torch.bincount(seen[n].reshape(-1, seen[n].shape[-1])[real].flatten(), minlength=experts)
                        for n in routers])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_step_counts_each_real_token_once_per_layer(tiny_model, family):
    tokens, advantages, logp_rollout = batch(16)
    policy = Policy(policy_config(tiny_model(family), micro_batch_size=5),
                    GRPOConfig(group_size=4, horizon=8, kl_coef=0.1), MismatchConfig())
    metrics = policy.backward(tokens, advantages, logp_rollout)   # + logp_old and KL reference passes
    counts = policy.routing.counts
    k = policy.model.get_base_model().config.get_text_config().num_experts_per_tok
    real = int(tokens.attention_mask.sum())
    assert real < tokens.attention_mask.numel()                    # the batch has padding
    assert counts.sum(dim=1).tolist() == [k * real] * len(counts)  # once per layer, padding never
    assert torch.equal(counts, _routes_by_hand(policy, tokens))   # the experts the routers chose
    assert metrics["experts/trainer/dead"] == float((counts == 0).sum())
    per_layer = [metrics[f"experts/trainer/dead/{_layer_label(n)}"] for n in policy.routing.names]
    assert per_layer == (counts == 0).sum(dim=1).tolist()


def test_checkpointing_recomputes_without_counting_again(tiny_qwen3_moe):
    from dataclasses import replace

    tokens, advantages, logp_rollout = batch(16)
    counts = []
    for checkpointing in (False, True):
        cfg = replace(policy_config(tiny_qwen3_moe, micro_batch_size=5), gradient_checkpointing=checkpointing)
        policy = Policy(cfg, GRPO, MismatchConfig())
        policy.backward(tokens, advantages, logp_rollout)
        counts.append(policy.routing.counts.clone())
    assert torch.equal(counts[0], counts[1])


def test_a_dense_model_has_no_expert_load(tmp_path):
    from qerl_rollout.tiny import build_tiny_model

    dense = build_tiny_model("qwen3_moe", tmp_path / "dense", mlp_only_layers=[0, 1])
    policy = Policy(policy_config(dense), GRPO, MismatchConfig())
    assert policy.routing is None and RouterHooks.attach(policy.model) is None
    tokens, advantages, logp_rollout = batch(4)
    assert not any(k.startswith("experts/") for k in policy.backward(tokens, advantages, logp_rollout))
