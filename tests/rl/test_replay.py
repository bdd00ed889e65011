"""Rollout routing replay (R3) and router agreement in the trainer (`rl.routing`, `rl.policy`).

- Replaying the trainer's own routing gives exactly (bit for bit) its normal log-probs, loss and
  gradients, on the five MoE families, padding (-1 routes) included.
- Replaying another routing equals a hand-built forward with those experts: each router
  replaced by a function written here from the transformers source (router logits, then that
  family's weights over the given experts), log-probs and gradients bit for bit. Replay that did
  nothing, or weights taken from the wrong rule, would differ.
- Gradient checkpointing recomputes with the replayed routes (the same gradients as without it).
- Agreement, flip rate and the rollout's expert load against counts derived by hand.
- `TokenBatch` places each sample's routes at its tokens' columns; bad input is refused.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from one_step import batch, policy_config

from qerl_rollout.rl.grpo import GRPOConfig
from qerl_rollout.rl.mismatch import MismatchConfig
from qerl_rollout.rl.policy import Policy, PolicyConfig, TokenBatch
from qerl_rollout.rl.routing import RouterHooks, recorded_routes, router_modules
from qerl_rollout.rollout.types import Sample

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe"]
GRPO_KL = GRPOConfig(group_size=4, horizon=8, kl_coef=0.1)     # the KL reference pass replays too


def _policy(model_dir, replay: str = "none", micro_batch_size: int = 5, **overrides) -> Policy:
    cfg = replace(policy_config(model_dir, micro_batch_size), routing_replay=replay, **overrides)
    return Policy(cfg, GRPO_KL, MismatchConfig())


def _grads(policy: Policy) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def own_routes(policy: Policy, tokens: TokenBatch) -> torch.Tensor:
    """(B, T, layers, k) int16: the experts the policy's routers choose on `tokens`, -1 on padding."""
    with recorded_routes(policy.model) as seen, torch.no_grad():
        policy._forward(tokens)
    B, T = tokens.input_ids.shape
    routes = torch.stack([seen[n].reshape(B, T, -1) for n in seen], dim=2).to(torch.int16)
    routes[tokens.attention_mask == 0] = -1
    return routes


def random_routes(tokens: TokenBatch, layers: int, k: int, experts: int, seed: int = 3) -> torch.Tensor:
    """(B, T, layers, k) int16: k distinct random experts for every token, padding included."""
    g = torch.Generator().manual_seed(seed)
    B, T = tokens.input_ids.shape
    return torch.rand(B, T, layers, experts, generator=g).argsort(-1)[..., :k].to(torch.int16)


def _hand_weights(router, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The routing weights of `chosen` experts, as each family's router computes them for its
    own top-k (transformers 5: Qwen3MoeTopKRouter and kin, MixtralTopKRouter, DeepseekV3TopkRouter)."""
    family = type(router).__name__
    if family == "DeepseekV3TopkRouter":
        w = torch.gather(torch.sigmoid(logits), 1, chosen)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) if router.norm_topk_prob else w
        return w * router.routed_scaling_factor
    probs = F.softmax(logits.float(), dim=-1)
    w = torch.gather(probs, 1, chosen)
    if family == "MixtralTopKRouter":
        return w / w.sum(-1, keepdim=True)
    w = w / w.sum(-1, keepdim=True) if router.norm_topk_prob else w
    return w.to(logits.dtype)


def _hand_routed(policy: Policy, routes: torch.Tensor):
    """Replace every router's forward by one that routes to `routes` (all tokens), weighted by
    `_hand_weights`; returns the undo."""
    saved = []
    for layer, router in enumerate(router_modules(policy.model).values()):
        def forward(hidden, router=router, layer=layer):
            h = hidden.reshape(-1, router.weight.shape[1])
            if type(router).__name__ == "DeepseekV3TopkRouter":
                logits = F.linear(h.float(), router.weight.float())
            else:
                logits = F.linear(h, router.weight)
            chosen = routes.reshape(-1, *routes.shape[2:])[:, layer].long()
            return logits, _hand_weights(router, logits, chosen), chosen
        saved.append((router, router.forward))
        router.forward = forward
    return lambda: [setattr(r, "forward", f) for r, f in saved]


def _shape(policy: Policy) -> tuple[int, int, int]:
    hooks = policy.routing
    return len(hooks.names), hooks.top_k, hooks.num_experts


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_the_trainers_own_routing_changes_nothing(tiny_model, family):
    tokens, advantages, logp_rollout = batch(16)
    plain = _policy(tiny_model(family))
    expected = plain.backward(tokens, advantages, logp_rollout)
    r3 = _policy(tiny_model(family), "r3")
    replayed = replace(tokens, routes=own_routes(r3, tokens))
    assert (replayed.routes[tokens.attention_mask == 0] == -1).all()     # padding routes itself
    got = r3.backward(replayed, advantages, logp_rollout)
    assert got["loss"] == expected["loss"]
    _assert_same(_grads(plain), _grads(r3))
    assert torch.equal(plain.logprobs(tokens), r3.logprobs(replayed))
    assert (got["router/topk_agreement"], got["router/flip_rate"]) == (1.0, 0.0)
    assert got["experts/rollout/load_cv"] == got["experts/trainer/load_cv"]


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_another_routing_equals_a_hand_built_forward(tiny_model, family):
    tokens, advantages, logp_rollout = batch(16)
    r3 = _policy(tiny_model(family), "r3", micro_batch_size=16)     # the hand router sees whole batches
    routes = random_routes(tokens, *_shape(r3))
    replayed = replace(tokens, routes=routes)
    assert not torch.equal(routes[tokens.attention_mask == 1], own_routes(r3, tokens)[tokens.attention_mask == 1])
    got = r3.backward(replayed, advantages, logp_rollout)

    hand = _policy(tiny_model(family), micro_batch_size=16)
    undo = _hand_routed(hand, routes)
    try:
        expected = hand.backward(tokens, advantages, logp_rollout)
        assert torch.equal(hand.logprobs(tokens), r3.logprobs(replayed))
    finally:
        undo()
    assert got["loss"] == expected["loss"]
    _assert_same(_grads(hand), _grads(r3))
    assert got["router/flip_rate"] > 0.5          # random routes rarely match the router's own


def test_a_checkpointed_recompute_replays_the_same_routes(tiny_qwen3_moe):
    tokens, advantages, logp_rollout = batch(16)
    grads = []
    for checkpointing in (False, True):
        policy = _policy(tiny_qwen3_moe, "r3", gradient_checkpointing=checkpointing)
        replayed = replace(tokens, routes=random_routes(tokens, *_shape(policy)))
        policy.backward(replayed, advantages, logp_rollout)
        grads.append(_grads(policy))
    _assert_same(*grads)


def test_agreement_and_rollout_load_by_hand(tiny_qwen3_moe):
    """Compare only (no replay): layer 0 of 5 real tokens keeps one of its two experts; row 0's
    tokens have no route in layer 1. Hand-derived agreement, flips, compared and load."""
    tokens, advantages, logp_rollout = batch(16)
    policy = _policy(tiny_qwen3_moe)
    routes = own_routes(policy, tokens)
    layers, k, experts = _shape(policy)
    assert k == 2
    real = tokens.attention_mask.bool()
    rows, cols = real.nonzero(as_tuple=True)
    for b, t in zip(rows[:5].tolist(), cols[:5].tolist()):
        a, _ = routes[b, t, 0].tolist()
        routes[b, t, 0, 1] = next(e for e in range(experts) if e not in routes[b, t, 0].tolist())
        assert routes[b, t, 0, 0] == a
    routes[0, :, 1] = -1
    metrics = policy.backward(replace(tokens, routes=routes), advantages, logp_rollout)
    n, n_row0 = int(real.sum()), int(real[0].sum())
    assert policy.routing.compared.tolist() == [n, n - n_row0]
    assert policy.routing.flips.tolist() == [5, 0]
    assert policy.routing.overlap.tolist() == [k * n - 5, k * (n - n_row0)]
    assert metrics["router/flip_rate/layer0"] == 5 / n
    assert metrics["router/flip_rate"] == 5 / (2 * n - n_row0)
    assert metrics["router/topk_agreement"] == pytest.approx(1 - 5 / (k * (2 * n - n_row0)), abs=1e-15)
    theirs = torch.stack([torch.bincount(routes[..., i, :][real & (routes[..., i, 0] >= 0)].long().flatten(),
                                         minlength=experts) for i in range(layers)])
    assert torch.equal(policy.routing.rollout_counts, theirs)


def test_bad_routes_and_configs_are_refused(tiny_qwen3_moe, tmp_path):
    from qerl_rollout.tiny import build_tiny_model

    tokens, advantages, logp_rollout = batch(4)
    r3 = _policy(tiny_qwen3_moe, "r3")
    with pytest.raises(ValueError, match="carries no rollout routes"):
        r3.backward(tokens, advantages, logp_rollout)
    layers, k, experts = _shape(r3)
    wrong = replace(tokens, routes=random_routes(tokens, layers, k, experts)[..., :1])
    with pytest.raises(ValueError, match="do not fit"):
        r3.backward(wrong, advantages, logp_rollout)
    dense = build_tiny_model("qwen3_moe", tmp_path / "dense", mlp_only_layers=[0, 1])
    with pytest.raises(ValueError, match="needs a MoE model"):
        _policy(dense, "r3")
    with pytest.raises(ValueError, match="unknown routing_replay"):
        PolicyConfig(routing_replay="r2")
    with pytest.raises(ValueError, match="no weight rule for router Linear"):
        RouterHooks({"model.layers.0.mlp.gate": torch.nn.Linear(4, 4)}, 4, 2).check_replayable()


def test_samples_routes_land_at_their_tokens_columns():
    def sample(prompt, response, routes):
        return Sample(0, response, [-0.5] * len(response), 0, prompt_token_ids=prompt, routes=routes)

    r0 = np.arange(5 * 1 * 2, dtype=np.int16).reshape(5, 1, 2)       # prompt 2 + response 3
    r1 = np.full((3, 1, 2), 7, dtype=np.int16)                         # prompt 3 + response 1, last one missing
    tokens, _ = TokenBatch.from_samples([sample([5, 6], [7, 8, 9], r0), sample([5, 6, 7], [8], r1[:3])], 0)
    assert tokens.routes.shape == (2, 3 + 3, 1, 2) and tokens.routes.dtype == torch.int16
    assert tokens.routes[0, 1:6].tolist() == r0.tolist() and (tokens.routes[0, 0] == -1).all()
    assert (tokens.routes[1, :3] == 7).all() and (tokens.routes[1, 3:] == -1).all()
    no_routes, _ = TokenBatch.from_samples([sample([5], [6], r0[:2]), sample([5], [6], None)], 0)
    assert no_routes.routes is None                                     # all samples, or none
    with pytest.raises(ValueError, match="routes for 5 tokens but 2"):
        TokenBatch.from_samples([sample([5], [6], r0)], 0)
    with pytest.raises(ValueError, match="differ in"):
        TokenBatch.from_samples([sample([5], [6], r0[:2]), sample([5], [6], np.zeros((2, 2, 2), np.int16))], 0)
