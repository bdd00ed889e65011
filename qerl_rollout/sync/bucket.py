"""Group encoded units into buckets of about `max_bytes` for the transport.

A unit is never split (see `stream.py`): a bucket closes before the unit that would push it
past `max_bytes`, and a unit larger than `max_bytes` travels alone in its own bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

Payload = list[tuple[str, torch.Tensor]]


def nbytes(payload: Payload) -> int:
    return sum(t.numel() * t.element_size() for _, t in payload)


def buckets(encoded_units: Iterable[Payload], max_bytes: int) -> Iterator[Payload]:
    if max_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {max_bytes}")
    bucket: Payload = []
    size = 0
    for unit in encoded_units:
        unit_bytes = nbytes(unit)
        if bucket and size + unit_bytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket += unit
        size += unit_bytes
    if bucket:
        yield bucket
