"""GRPO math: hand-derived numbers, sign/mask failure checks, and equality with verl's core_algos."""

import math

import numpy as np
import pytest
import torch

from qerl_rollout.rl.grpo import (
    AGG_MODES,
    GRPOConfig,
    aggregate,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_penalty,
    policy_loss,
)

# --- advantages ------------------------------------------------------------------------------


def test_group_advantages_hand_derived():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 1: all equal -> 0
    z = 0.5 / math.sqrt(1 / 3)
    expected = torch.tensor([z, -z, -z, z, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_group_advantages_dr_grpo_is_mean_centred_only():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4, norm_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]))


def test_group_advantages_rejects_ragged_batch():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), group_size=4)


# --- policy loss -----------------------------------------------------------------------------

RATIOS = torch.tensor([[1.5, 0.5, 1.1]])


def _loss(adv, **kw):
    logp = torch.log(RATIOS).requires_grad_(True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 3), torch.tensor([adv]), torch.ones(1, 3),
                                clip_low=0.2, clip_high=0.28, **kw)
    return loss, metrics, logp


def test_policy_loss_hand_derived_positive_advantage():
    # ratios 1.5, 0.5, 1.1 -> clipped 1.28, 0.8, 1.1; per token max(-r, -clip(r)) with A = 1
    loss, metrics, _ = _loss(1.0)
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 1.1) / 3, abs=1e-6)
    assert metrics["pg_clipfrac"] == pytest.approx(1 / 3)


def test_policy_loss_hand_derived_negative_advantage():
    # A = -1: per token max(r, clip(r)) = 1.5, 0.8, 1.1
    loss, metrics, _ = _loss(-1.0)
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3, abs=1e-6)
    assert metrics["pg_clipfrac"] == pytest.approx(1 / 3)


def test_policy_loss_gradient_sign_raises_logp_of_good_tokens():
    """A wrong sign would make descending the loss lower the log-prob of a rewarded token."""
    logp = torch.zeros(1, 3, requires_grad=True)  # ratio 1: inside the clip band
    loss, _ = policy_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3))
    loss.backward()
    assert (logp.grad < 0).all()  # gradient descent raises logp
    torch.testing.assert_close(logp.grad, torch.full((1, 3), -1 / 3))


def test_clipped_tokens_get_no_gradient():
    loss, _, logp = _loss(1.0)
    loss.backward()
    # token 0 (ratio 1.5 > 1.28, A > 0) is clipped: zero gradient; the others are not
    assert logp.grad[0, 0] == 0
    assert logp.grad[0, 1] != 0 and logp.grad[0, 2] != 0


def test_mask_excludes_padding_and_missing_mask_changes_the_loss():
    logp = torch.tensor([[-1.0, -2.0, -30.0]])  # last token is padding with junk log-prob
    old = torch.tensor([[-1.1, -1.9, 0.0]])
    adv, mask = torch.tensor([1.0]), torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = policy_loss(logp, old, adv, mask)
    ratios = torch.exp(logp[0, :2] - old[0, :2])
    expected = -(ratios.clamp(0.8, 1.2)).sum() / 2  # both ratios inside the band
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    unmasked, _ = policy_loss(logp, old, adv, torch.ones(1, 3))
    assert abs(unmasked.item() - loss.item()) > 0.1
    # junk at the masked position does not matter
    logp2 = logp.clone()
    logp2[0, 2] = 5.0
    assert policy_loss(logp2, old, adv, mask)[0].item() == pytest.approx(loss.item())


def test_is_weights_multiply_the_clipped_objective_without_gradient():
    logp = torch.zeros(1, 3, requires_grad=True)
    weights = torch.tensor([[2.0, 0.5, 1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3),
                          is_weights=weights)
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 1.0) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -0.5, -1.0]]) / 3)
    assert weights.grad is None


def test_dual_clip_caps_negative_advantage_loss():
    logp = torch.log(torch.tensor([[5.0]]))
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1),
                          clip_c=3.0)
    assert loss.item() == pytest.approx(3.0)  # min(max(5, clip(5)), 3)
    loss_plain, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss_plain.item() == pytest.approx(5.0)


# --- aggregation -----------------------------------------------------------------------------

LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token-mean", 10 / 4),
        ("seq-mean-token-mean", (2 + 4) / 2),  # the empty third row is not a sequence
        ("seq-mean-token-sum", (6 + 4) / 2),
        ("seq-mean-token-sum-norm", (6 + 4) / 2 / 3),
    ],
)
def test_aggregate_hand_derived(agg, expected):
    assert aggregate(LOSS_MAT, MASK, agg).item() == pytest.approx(expected)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_with_batch_denominators_sum_to_the_batch_loss(agg):
    torch.manual_seed(0)
    loss_mat, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    whole = aggregate(loss_mat, mask, agg)
    denominators = {"num_tokens": mask.sum(), "num_seqs": (mask.sum(-1) > 0).sum()}
    parts = sum(aggregate(loss_mat[i : i + 2], mask[i : i + 2], agg, **denominators)
                for i in range(0, 6, 2))
    torch.testing.assert_close(parts, whole)


def test_unknown_agg_mode_fails():
    with pytest.raises(ValueError):
        aggregate(LOSS_MAT, MASK, "mean")
    with pytest.raises(ValueError):
        GRPOConfig(agg="mean")


# --- KL and entropy --------------------------------------------------------------------------


def test_kl_estimators_hand_derived():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2), abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert kl_penalty(logp, logp, "k3").item() == 0.0


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_grpo_loss_adds_kl_and_subtracts_entropy():
    logp, old = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    adv, mask, entropy = torch.tensor([1.0]), torch.ones(1, 2), torch.full((1, 2), 2.0)
    cfg = GRPOConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    loss, metrics = grpo_loss(logp, old, adv, mask, cfg, logp_ref=ref, entropy=entropy)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * math.log(2) - 0.01 * 2.0, abs=1e-6)
    assert metrics["kl"] == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv, mask, cfg)  # kl_coef > 0 without a reference


# --- oracle: verl's core_algos -----------------------------------------------------------------


class _ActorConfig:
    """The attributes compute_policy_loss_vanilla reads from verl's ActorConfig."""

    def __init__(self, clip_low, clip_high, clip_c=3.0):
        self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = clip_low, clip_low, clip_high
        self.clip_ratio_c = clip_c
        self.global_batch_info = {}

    def get(self, key, default=None):
        return getattr(self, key, default)


def _random_rollouts(seed, groups=4, group_size=5, T=7):
    gen = torch.Generator().manual_seed(seed)
    B = groups * group_size
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    rewards = torch.randint(0, 3, (B,), generator=gen).float()
    logp_old = -torch.rand(B, T, generator=gen) * 3
    logp = logp_old + torch.randn(B, T, generator=gen) * 0.3
    is_weights = torch.rand(B, T, generator=gen) * 2
    return rewards, mask, logp, logp_old, is_weights, lengths


@pytest.mark.parametrize("norm_std", [True, False])
def test_group_advantages_match_verl(norm_std):
    from verl.trainer.ppo import core_algos  # installed by the setup (no-deps oracle)
    rewards, mask, *_, lengths = _random_rollouts(0)
    token_rewards = torch.zeros_like(mask)
    token_rewards[torch.arange(len(rewards)), lengths - 1] = rewards  # reward on the last token
    index = np.repeat(np.arange(4), 5)
    verl_adv, _ = core_algos.compute_grpo_outcome_advantage(
        token_rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm_std
    )
    ours = group_advantages(rewards, 5, norm_std=norm_std, eps=1e-6)
    torch.testing.assert_close(ours[:, None] * mask, verl_adv, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dual_clip", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
def test_policy_loss_matches_verl(agg, dual_clip, with_weights):
    from verl.trainer.ppo import core_algos  # installed by the setup (no-deps oracle)
    rewards, mask, logp, logp_old, is_weights, _ = _random_rollouts(1)
    adv = group_advantages(rewards, 5)
    weights = is_weights if with_weights else None
    config = _ActorConfig(0.2, 0.28, clip_c=3.0 if dual_clip else 1e9)
    verl_loss, verl_metrics = core_algos.compute_policy_loss_vanilla(
        logp_old, logp, adv[:, None] * mask, mask, loss_agg_mode=agg, config=config,
        rollout_is_weights=weights,
    )
    loss, metrics = policy_loss(logp, logp_old, adv, mask, 0.2, 0.28, agg,
                                is_weights=weights, clip_c=3.0 if dual_clip else None)
    torch.testing.assert_close(loss, verl_loss, atol=1e-6, rtol=1e-6)
    assert metrics["pg_clipfrac"] == pytest.approx(verl_metrics["actor/pg_clipfrac"], abs=1e-6)
    assert metrics["ppo_kl"] == pytest.approx(verl_metrics["actor/ppo_kl"], abs=1e-6)
    # the oracle can fail: a flipped advantage sign does not match verl
    flipped, _ = policy_loss(logp, logp_old, -adv, mask, 0.2, 0.28, agg, is_weights=weights)
    assert not torch.allclose(flipped, verl_loss, atol=1e-4)


def test_kl_penalty_matches_verl():
    from verl.trainer.ppo import core_algos  # installed by the setup (no-deps oracle)
    _, _, logp, logp_old, *_ = _random_rollouts(2)
    for ours, theirs in (("k1", "k1"), ("k2", "k2"), ("k3", "low_var_kl")):
        torch.testing.assert_close(kl_penalty(logp, logp_old, ours),
                                   core_algos.kl_penalty(logp, logp_old, theirs))


def test_group_advantages_leave_non_finite_rewards_out():
    # Group 1: [1, nan, 0, 1] -> stats over [1, 0, 1]: mean 2/3, unbiased std sqrt(1/3);
    # the NaN sample gets 0. Group 2 is all finite and matches the plain computation.
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=4, eps=0.0)
    std = (1 / 3) ** 0.5
    expected = [(1 - 2 / 3) / std, 0.0, (0 - 2 / 3) / std, (1 - 2 / 3) / std]
    assert torch.allclose(adv[:4], torch.tensor(expected), atol=1e-6)
    assert torch.equal(adv[4:], group_advantages(rewards[4:], group_size=4, eps=0.0))
    inf = group_advantages(torch.tensor([float("inf"), 1.0, 0.0, 0.5]), group_size=4)
    assert inf[0] == 0 and torch.isfinite(inf).all()
