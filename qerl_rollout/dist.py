"""DTensor helpers shared by the trainer (`rl.fsdp`, `rl.policy`) and the sharded sync.

Under FSDP2 every parameter is a DTensor sharded on dim 0 with torch.chunk sizes: rank r
holds rows [r*ceil(N/W), min((r+1)*ceil(N/W), N)). `row_range` is that arithmetic;
`local_tensor` and `full_tensor` read a parameter's shard or whole value and pass plain
tensors through, so the same code runs in one process.
"""

from __future__ import annotations

import torch


def row_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of an n-row tensor that `rank` holds under Shard(0) (torch.chunk)."""
    chunk = -(-n // world) if n else 0
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (the tensor itself when not distributed)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every rank must call it), else `t`."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t
