"""Group encoded units into buckets of about `max_bytes` for the transport; digest them.

A unit is never split (see `stream.py`): a bucket closes before the unit that would push it
past `max_bytes`, and a unit larger than `max_bytes` travels alone in its own bucket.

`digests(payload)` names each tensor's bytes (BLAKE2b of dtype, shape and raw bytes, 16
bytes), the same on the sending and the receiving side of any transport: the exact half of
the push check (`sync.verify`) compares what the trainer sent with what each engine loaded.
"""

from __future__ import annotations

import hashlib
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


def tensor_digest(t: torch.Tensor) -> str:
    """BLAKE2b of a tensor's dtype, shape and bytes (any dtype: the bytes are viewed as uint8)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{flat.dtype}|{tuple(t.shape)}|".encode())
    h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def digests(payload: Payload) -> dict[str, str]:
    """name -> `tensor_digest` of each tensor of a bucket."""
    return {name: tensor_digest(t) for name, t in payload}
