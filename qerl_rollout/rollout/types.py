"""The rollout side's small interfaces, free of vLLM so that trainers and sync can import them.

`Sample` is what generation returns. `WeightReceiver` is everything a weight sync needs from
an engine, in-process or behind a transport: what it expects (`manifest`), and a three-step
update (`begin_update`, `load` one bucket at a time, `commit`), or `abort` on failure; a push
check also reads back what the engine received (`received_digests`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Sample:
    """One generated response.

    token_ids: generated tokens (prompt excluded).
    logprobs:  per generated token, the log-probability of the sampled token under the
               engine's weights and sampling distribution (after temperature / top-p).
    version:   the weight version that produced it.
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    version: int
    finish_reason: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)


class EngineStateError(RuntimeError):
    """The engine holds a partial weight update and refuses to serve until a push completes."""


class WeightReceiver(Protocol):
    """An engine that can take a versioned stream of weights."""

    mode: str      # "kernel" (compressed tensors) or "emulate" (BF16 QDQ values)
    scheme: str    # the quant scheme the engine expects
    version: int   # the version it serves

    def manifest(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Checkpoint name -> (shape, dtype) of every tensor the engine accepts in `load`."""

    def begin_update(self, version: int, digest: bool = False) -> None:
        """`digest=True` (asked only by push checks): remember the digests of what this update
        loads (`sync.bucket.digests`) for `received_digests()`."""

    def received_digests(self) -> dict[str, str] | list[dict[str, str]] | None:
        """What the last committed update loaded, by name (one dict per engine behind a pool)."""

    def load(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket; it holds whole engine layers (never part of a fused layer)."""

    def commit(self, version: int) -> None: ...

    def abort(self, reason: str) -> None: ...
