"""What the training loop asks of a placement: `Trainer`, `Rollout` and `Placement`.

How it works. These are typing Protocols: `placement.local` (everything in this process) and
`placement.ray` (trainer ranks and engines in Ray actors) implement them without inheriting,
and `train.run` speaks only these methods, so a new placement is a new module here.
`tests/test_placement_interface.py` checks that every implementation has every method, with
the same parameters.

    Trainer    train_step, push (into a target: "rollout" or "baseline"), the push check's
               reference, the checkpoint's state (written and read by the ranks), the final adapter; `to_device` where the
               trainer moves (colocated)
    Rollout    generate, score, score_each (every engine, for the push check), the receiver
               a push streams into
    Placement  trainer, rollout, baseline (the BF16 engine, or None), phase(name) before each
               phase of a step (`placement.phases`), close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from qerl_rollout.rollout.types import Sample
from qerl_rollout.wire.receiver import WeightReceiver


@runtime_checkable
class Trainer(Protocol):
    def train_step(self, batch, advantages: torch.Tensor, logp_rollout: torch.Tensor) -> dict:
        """One optimizer step on the batch; its metrics."""

    def push(self, target: str = "rollout", *, noise=None, version: int | None = None,
             full: bool = False, digest: bool = False):
        """Merge, requantize and stream the policy into `target`'s engines; the `SyncReport`.
        `noise`: `rl.aqn.NormNoise` for this push only; `digest`: for a push check."""

    def reference_logprobs(self, probe, scheme: str) -> list[list[float]] | None:
        """The push check's reference scores of `probe`, or None (a sharded trainer)."""

    def save_state(self, path: str | Path) -> None:
        """Write the trainable state into checkpoint directory `path`, each rank its shards."""

    def load_state(self, path: str | Path) -> None:
        """Restore `save_state`'s directory (written by any number of ranks)."""

    def save_adapter(self, path: str | Path) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Rollout(Protocol):
    receiver: WeightReceiver

    def generate(self, prompt_token_ids: list[list[int]], **sampling) -> list[Sample]:
        """n samples per prompt, prompt-major (`RolloutEngine.generate`)."""

    def score(self, prompt_token_ids: list[list[int]],
              response_token_ids: list[list[int]]) -> list[list[float]]: ...

    def score_each(self, prompt_token_ids: list[list[int]],
                   response_token_ids: list[list[int]]) -> list[list[list[float]]]:
        """Every engine scores all of them: one list per engine."""

    def close(self) -> None: ...


@runtime_checkable
class Placement(Protocol):
    trainer: Trainer
    rollout: Rollout
    baseline: Rollout | None

    def phase(self, name: str) -> None:
        """Make room for phase `name` ("rollout", "train", "push"; `placement.phases`)."""

    def close(self) -> None: ...
