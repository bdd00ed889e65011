"""Truncated importance sampling, rejection and mismatch metrics, with hand-derived numbers."""

import math

import pytest
import torch

from qerl_rollout.rl.mismatch import (
    MismatchConfig,
    correct_mismatch,
    importance_weights,
    rejection_mask,
)

# rho = pi_old / pi_rollout per token: 2.5, 0.5, 0.4, 1.0 (row 0); row 1 has one real token
P_OLD = torch.tensor([[0.5, 0.2, 0.2, 0.3], [0.3, 0.9, 0.9, 0.9]])
P_ROLLOUT = torch.tensor([[0.2, 0.4, 0.5, 0.3], [0.3, 0.1, 0.1, 0.1]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
LOGP_OLD, LOGP_ROLLOUT = P_OLD.log(), P_ROLLOUT.log()


def test_token_tis_hand_derived():
    weights, rho = importance_weights(LOGP_OLD, LOGP_ROLLOUT, MASK, "token", cap=2.0)
    expected = torch.tensor([[2.0, 0.5, 0.4, 1.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(weights, expected)
    assert rho[0, 0].item() == pytest.approx(2.5)


def test_weights_follow_old_over_rollout_not_the_inverse():
    """A swapped ratio (rollout / old) would give 0.4 for the first token, not the cap."""
    weights, _ = importance_weights(LOGP_ROLLOUT, LOGP_OLD, MASK, "token", cap=2.0)
    assert weights[0, 0].item() == pytest.approx(0.4)
    weights, _ = importance_weights(LOGP_OLD, LOGP_ROLLOUT, MASK, "token", cap=2.0)
    assert weights[0, 0].item() == 2.0


def test_sequence_and_geometric_levels():
    weights, _ = importance_weights(LOGP_OLD, LOGP_ROLLOUT, MASK, "sequence", cap=2.0)
    # row 0: prod = 2.5 * 0.5 * 0.4 * 1.0 = 0.5, row 1: 1.0 (padding does not count)
    torch.testing.assert_close(weights, torch.tensor([[0.5] * 4, [1.0, 0, 0, 0]]))
    weights, _ = importance_weights(LOGP_OLD, LOGP_ROLLOUT, MASK, "geometric", cap=2.0)
    assert weights[0, 0].item() == pytest.approx(0.5 ** 0.25, rel=1e-5)


def test_token_rejection_band():
    cfg = MismatchConfig(reject="token", reject_low=0.45, reject_high=2.0)
    kept = rejection_mask(LOGP_OLD, LOGP_ROLLOUT, MASK, cfg)
    # 2.5 out, 0.5 in, 0.4 out, 1.0 in; row 1 keeps its only token
    torch.testing.assert_close(kept, torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0, 0, 0]]))


def test_sequence_rejection_drops_whole_responses():
    cfg = MismatchConfig(reject="sequence", reject_low=0.9, reject_high=1.1)
    kept = rejection_mask(LOGP_OLD, LOGP_ROLLOUT, MASK, cfg)
    # row 0 geometric mean 0.5**0.25 = 0.84 < 0.9: dropped; row 1 is 1.0: kept
    torch.testing.assert_close(kept, torch.tensor([[0.0] * 4, [1.0, 0, 0, 0]]))


def test_correct_mismatch_metrics_hand_derived():
    weights, kept, m = correct_mismatch(LOGP_OLD, LOGP_ROLLOUT, MASK, MismatchConfig())
    torch.testing.assert_close(kept, MASK)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 0.4, 1.0], [1.0, 0, 0, 0]]))
    w = torch.tensor([2.0, 0.5, 0.4, 1.0, 1.0])
    assert m["is_weight_mean"] == pytest.approx(w.mean().item())
    assert m["is_weight_max"] == 2.0
    assert m["is_clipped_frac"] == pytest.approx(1 / 5)
    assert m["is_ess"] == pytest.approx((w.sum() ** 2 / (5 * (w ** 2).sum())).item())
    rho = torch.tensor([2.5, 0.5, 0.4, 1.0, 1.0])
    assert m["mismatch_kl_k1"] == pytest.approx((-rho.log()).mean().item(), abs=1e-6)
    assert m["mismatch_kl_k3"] == pytest.approx((rho - rho.log() - 1).mean().item(), abs=1e-6)
    assert m["rejected_frac"] == 0.0


def test_identical_policies_give_unit_weights_and_zero_kl():
    weights, _, m = correct_mismatch(LOGP_OLD, LOGP_OLD, MASK, MismatchConfig())
    torch.testing.assert_close(weights, MASK)
    assert m["mismatch_kl_k1"] == 0.0 and m["mismatch_kl_k3"] == 0.0
    assert m["is_ess"] == pytest.approx(1.0)


def test_level_none_returns_no_weights_but_still_rejects():
    cfg = MismatchConfig(level="none", reject="token", reject_low=0.45)
    weights, _, m = correct_mismatch(LOGP_OLD, LOGP_ROLLOUT, MASK, cfg)
    assert weights is None
    assert m["rejected_frac"] == pytest.approx(2 / 5)


def test_weights_carry_no_gradient():
    logp_old = LOGP_OLD.clone().requires_grad_(True)
    weights, _, _ = correct_mismatch(logp_old, LOGP_ROLLOUT, MASK, MismatchConfig())
    assert not weights.requires_grad


def test_config_validation():
    with pytest.raises(ValueError):
        MismatchConfig(level="tokens")
    with pytest.raises(ValueError):
        MismatchConfig(reject_low=1.5)
    assert math.isclose(MismatchConfig().cap, 2.0)
