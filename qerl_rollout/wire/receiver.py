"""`WeightReceiver`: everything a weight sync needs from an engine, in-process or behind a
transport: what it expects (`manifest`), and a three-step update (`begin_update`, `load` one
bucket at a time, `commit`), or `abort` on failure; a push check also reads back what the
engine received (`received_digests`). `rollout.RolloutEngine` implements it, and so do the
Ray transport's receivers (`workers.transport`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from qerl_rollout.quant.plan import Precision


class WeightReceiver(Protocol):
    """An engine that can take a versioned stream of weights."""

    mode: str      # "kernel" (compressed tensors) or "emulate" (BF16 QDQ values)
    scheme: str    # the quant scheme the engine expects
    precision: Precision   # which of its layers hold that scheme (`quant.plan.Precision`)
    version: int   # the version it serves

    def manifest(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Checkpoint name -> (shape, dtype) of every tensor the engine accepts in `load`."""

    def begin_update(self, version: int, digest: bool = False, delta: bool = False) -> None:
        """`digest=True` (asked only by push checks): remember the digests of what this update
        loads (`wire.bucket.digests`) for `received_digests()`. `delta=True` (asked only by
        delta syncs): buckets may carry patches (`wire.delta`) against the tensors of the last
        committed delta update, which the receiver keeps."""

    def received_digests(self) -> dict[str, str] | list[dict[str, str]] | None:
        """What the last committed update loaded, by name (one dict per engine behind a pool)."""

    def load(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket; it holds whole engine layers (never part of a fused layer)."""

    def commit(self, version: int) -> None: ...

    def abort(self, reason: str) -> None: ...
