"""What each phase of a step needs on a GPU that a trainer rank and an engine share, and the
moves that get there.

How it works. A colocated step runs three phases; each names where the trainer's state is and
which parts of the engine's memory are allocated (vLLM sleep mode level 1 releases both its
weights, kept on the host, and its KV cache; `wake_up(tags)` reallocates parts):

    phase     trainer   engine        what runs
    train     GPU       asleep        the optimizer step (also a checkpoint)
    push      GPU       weights       merge, requantize, stream into the engine
    rollout   host      weights + KV  generate and score

`phase_moves(state, phase)` gives the moves from one state to another, releases before
acquisitions: the engine sleeps before the trainer returns to the GPU, the trainer leaves
(and empties its allocator cache, `rl.policy.Policy.to_device`) before the KV cache wakes. So
no phase holds more than its row: the push holds the trainer and the engine's weights, never
its KV cache (the plan's "colocated: push phase"). Any phase may follow any other (a re-push
after a failed check, a checkpoint after an eval); a phase already reached moves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINE_PARTS = ("weights", "kv_cache")
PHASES: dict[str, tuple[bool, frozenset[str]]] = {
    "train": (True, frozenset()),
    "push": (True, frozenset({"weights"})),
    "rollout": (False, frozenset(ENGINE_PARTS)),
}


@dataclass(frozen=True)
class PhaseState:
    """Where the trainer is and which engine parts are allocated. At start-up both are resident."""

    trainer_on_gpu: bool = True
    engine_awake: frozenset[str] = frozenset(ENGINE_PARTS)


def check_phase(name: str) -> None:
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; phases are {sorted(PHASES)}")


def phase_moves(state: PhaseState, name: str) -> tuple[list[tuple], PhaseState]:
    """The moves from `state` into phase `name`, in order, and the state after them. A move is
    ("engines", "sleep"), ("trainer", device) or ("engines", "wake_up", [parts])."""
    check_phase(name)
    trainer_on_gpu, awake_wanted = PHASES[name]
    moves, awake = [], state.engine_awake
    if awake - awake_wanted:                  # vLLM sleeps all or nothing
        moves.append(("engines", "sleep"))
        awake = frozenset()
    if state.trainer_on_gpu and not trainer_on_gpu:
        moves.append(("trainer", "cpu"))
    if trainer_on_gpu and not state.trainer_on_gpu:
        moves.append(("trainer", "cuda"))
    if awake_wanted - awake:
        moves.append(("engines", "wake_up", sorted(awake_wanted - awake)))
    return moves, PhaseState(trainer_on_gpu, awake_wanted)


class ColocatedPhases:
    """Runs the moves on a trainer (`to_device(device)`) and an engine pool (`sleep()`,
    `wake_up(tags)`), keeping the state between phases."""

    def __init__(self, trainer, engines):
        self.trainer, self.engines = trainer, engines
        self.state = PhaseState()

    def enter(self, name: str) -> None:
        moves, state = phase_moves(self.state, name)
        for move in moves:
            if move[0] == "trainer":
                self.trainer.to_device(move[1])
            elif move[1] == "sleep":
                self.engines.sleep()
            else:
                self.engines.wake_up(move[2])
        self.state = state
