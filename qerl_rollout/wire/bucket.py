"""Group encoded units into buckets of about `max_bytes` for the transport; digest them.

A unit is never split (see `stream.py`): a bucket closes before the unit that would push it
past `max_bytes`, and a unit larger than `max_bytes` travels alone in its own bucket.

`digests(payload)` names each tensor's bytes (BLAKE2b of dtype, shape and raw bytes, 16
bytes), the same on the sending and the receiving side of any transport: the exact half of
the push check (`sync.verify`) compares what the trainer sent with what each engine loaded.

`flatten(payload)` lays a bucket's bytes end to end in one uint8 buffer and returns its
`BucketLayout` (names, dtypes, shapes, offsets); `unflatten(layout, buffer)` gives the tensors
back as views of the buffer. A transport that moves raw bytes (`workers.collective`) sends
the layout ahead and the buffer in one message.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate

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


ALIGN = 64   # bytes; a cache line, and a multiple of every dtype's size


@dataclass(frozen=True)
class BucketLayout:
    """Where each tensor of a flattened bucket lies: name, dtype, shape and byte offset, in
    bucket order (what a receiver needs to cut its buffer back into the tensors sent)."""

    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    nbytes: int


def flatten(payload: Payload) -> tuple[BucketLayout, torch.Tensor]:
    """A bucket as one contiguous uint8 CPU buffer (one copy) and its layout. Each tensor
    starts at a multiple of `ALIGN` bytes, so every view back is aligned for its dtype; the
    bytes are copied unchanged, so every dtype (float8, packed NVFP4) travels as it is."""
    names = tuple(name for name, _ in payload)
    if len(set(names)) != len(names):
        raise ValueError("a bucket names a tensor twice")
    sizes = [t.numel() * t.element_size() for _, t in payload]
    offsets = tuple(accumulate((-(-size // ALIGN) * ALIGN for size in sizes), initial=0))
    buffer = torch.empty(offsets[-1], dtype=torch.uint8)
    for (_, t), start, size in zip(payload, offsets, sizes):
        if size:
            buffer[start:start + size].copy_(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))
    layout = BucketLayout(names, tuple(t.dtype for _, t in payload), tuple(tuple(t.shape) for _, t in payload),
                          offsets[:-1], offsets[-1])
    return layout, buffer


def unflatten(layout: BucketLayout, buffer: torch.Tensor) -> Payload:
    """The tensors of a flattened bucket, as views of `buffer` (no copy)."""
    if buffer.dtype != torch.uint8 or buffer.numel() != layout.nbytes:
        raise ValueError(f"a bucket of {layout.nbytes} bytes arrived as {buffer.numel()} {buffer.dtype}")
    out = []
    for name, dtype, shape, start in zip(layout.names, layout.dtypes, layout.shapes, layout.offsets):
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append((name, buffer[start:start + size].view(dtype).reshape(shape)))
    return out
