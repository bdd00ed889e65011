"""The push check's pure parts: digests, the logprob gap, the probe, when it is due, and what
it does with a failing engine (fakes for the trainer and rollout interfaces; the real engines
are checked in tests/test_train.py and tests/rollout/test_engine_sync.py)."""

from __future__ import annotations

import pytest
import torch

from qerl_rollout.rollout.types import Sample
from qerl_rollout.sync.verify import (
    VERIFY_MAX_TOL,
    VERIFY_TOL,
    Probe,
    PushCheck,
    StalePushError,
    digest_problems,
    dlogp_stats,
)
from qerl_rollout.wire.bucket import digests, tensor_digest


def test_tensor_digest_sees_every_bit_dtype_and_shape():
    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    same = tensor_digest(t.clone())
    assert tensor_digest(t) == same
    flipped = t.clone()
    flipped.view(torch.int16).view(-1)[5] ^= 1      # one bit of one element
    assert tensor_digest(flipped) != same
    assert tensor_digest(t.reshape(4, 3)) != same    # same bytes, other shape
    assert tensor_digest(t.view(torch.int16)) != same
    assert tensor_digest(torch.tensor(1.0)) == tensor_digest(torch.tensor(1.0))   # 0-d works


def test_digest_problems_name_what_went_wrong():
    a, b = torch.ones(2), torch.zeros(2)
    sent = digests([("x", a), ("y", b)])
    assert digest_problems(sent, [dict(sent), dict(sent)]) == []
    dropped = {"x": sent["x"]}
    swapped = {"x": sent["y"], "y": sent["x"]}
    assert digest_problems(sent, [dict(sent), dropped]) == ["engine 1 did not load 1 tensor(s), e.g. y"]
    assert digest_problems(sent, [swapped]) == ["engine 0 loaded other bytes for 2 tensor(s), e.g. x"]
    assert digest_problems(sent, [{**sent, "z": "0"}]) == ["engine 0 loaded unsent 1 tensor(s), e.g. z"]
    assert "recorded no digests" in digest_problems(sent, [None])[0]


def test_dlogp_stats():
    assert dlogp_stats([[-1.0, -2.0], [-0.5]], [[-1.0, -2.25], [-0.25]]) == (0.25, 0.5 / 3)
    assert dlogp_stats([[]], [[]]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="different lengths"):
        dlogp_stats([[-1.0]], [[-1.0, -2.0]])


def test_one_flipped_token_passes_and_a_shift_of_every_token_or_one_large_gap_fails():
    """The two bounds (see `sync.verify.Tolerance`): one token 0.134 off among nine within 0.005
    (an INT8 kernel's router near a tie, measured on Mixtral) is in sync; every token 0.03 off
    is not (the mean), though its max is far smaller; nor is one token 0.3 off (the max)."""
    from qerl_rollout.sync.verify import Tolerance, check

    tol = Tolerance()
    assert (tol.mean, tol.max) == (VERIFY_TOL, VERIFY_MAX_TOL) == (0.02, 0.25)
    reference = [[-1.0] * 10]
    report = _Report(1, {})
    flipped = [[-1.0 - 0.134] + [-1.0 - 0.005] * 9]
    assert check(report, [{}], [flipped], reference).ok(tol)
    shifted = [[-1.0 - 0.03] * 10]
    result = check(report, [{}], [reference, shifted], reference)     # the worst engine decides
    assert result.describe(tol) == "mean |dlogp| 0.0300 > sync.verify_tol 0.02"
    one_far = [[-1.0 - 0.3] + [-1.0] * 9]
    assert check(report, [{}], [one_far], reference).describe(tol) == \
        "mean |dlogp| 0.0300 > sync.verify_tol 0.02; max |dlogp| 0.3000 > sync.verify_max_tol 0.25"
    with pytest.raises(ValueError, match="must be > 0"):
        Tolerance(0.0, 1.0)


def _sample(prompt_index, tokens):
    return Sample(prompt_index, tokens, [-1.0] * len(tokens), 0, prompt_token_ids=[7, prompt_index])


def test_probe_takes_the_first_response_of_each_prompt():
    samples = [_sample(0, []), _sample(0, [3, 4]), _sample(0, [5]), _sample(1, [6]), _sample(2, [8])]
    probe = Probe.from_samples(samples, n=2)
    assert probe == Probe([[7, 0], [7, 1]], [[3, 4], [6]])
    with pytest.raises(ValueError, match="no sample with a response"):
        Probe.from_samples([_sample(0, [])])


class _Report:
    def __init__(self, version, sent):
        self.version, self.digests = version, sent


class _Fakes:
    """A trainer and a rollout whose engine holds `served` (a tensor) and scores it as 0 or 1."""

    def __init__(self, stale_pushes):
        self.stale_pushes, self.pushes = stale_pushes, 0
        self.receiver = self

    def push(self):
        self.pushes += 1
        return _Report(self.pushes, {"w": "good"})

    def received_digests(self):
        return [{"w": "bad" if self.pushes <= self.stale_pushes else "good"}]

    def reference_logprobs(self, probe, scheme):
        return [[-1.0]]

    def score_each(self, prompts, responses):
        return [[[-1.0 - (2 * VERIFY_TOL if self.pushes <= self.stale_pushes else 0.0)]]]


def _check(every=3):
    return PushCheck(every, scheme="fp8_block", mode="emulate", platform="CPU test")


def test_due_on_the_first_check_and_every_nth_step():
    check = _check(every=3)
    assert check.due(5)                      # the first push this process makes (e.g. resumed)
    fakes = _Fakes(stale_pushes=0)
    check.run(fakes, fakes, fakes.push(), [_sample(0, [1])], fakes.push, noisy=False)
    assert [s for s in range(6, 13) if check.due(s)] == [6, 9, 12]
    assert not any(PushCheck(0, scheme="bf16", mode="emulate", platform="").due(s) for s in range(1, 9))


def test_a_stale_push_is_pushed_again_then_stops_the_run():
    fakes = _Fakes(stale_pushes=1)           # the re-push fixes it
    metrics = _check().run(fakes, fakes, fakes.push(), [_sample(0, [1])], fakes.push, noisy=False)
    assert metrics == {"sync/verify_hash_ok": 1.0, "sync/verify_repushed": 1, "sync/verify_max_dlogp": 0.0,
                       "sync/verify_mean_dlogp": 0.0}
    fakes = _Fakes(stale_pushes=2)           # it does not
    with pytest.raises(StalePushError) as e:
        _check().run(fakes, fakes, fakes.push(), [_sample(0, [1])], fakes.push, noisy=False)
    assert str(e.value) == ("the fp8_block/emulate engine does not serve the pushed weights (version 2, "
                            "after a full re-push) on CPU test: engine 0 loaded other bytes for 1 "
                            "tensor(s), e.g. w; mean |dlogp| 0.0400 > sync.verify_tol 0.02")


def test_a_noisy_push_is_checked_by_hash_only():
    fakes = _Fakes(stale_pushes=0)
    metrics = _check().run(fakes, fakes, fakes.push(), [_sample(0, [1])], fakes.push, noisy=True)
    assert metrics == {"sync/verify_hash_ok": 1.0, "sync/verify_repushed": 0}
