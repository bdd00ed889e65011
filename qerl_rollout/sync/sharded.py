"""The weight sync of an FSDP2-sharded trainer: quantize the rows each rank holds, then gather.

How it works. Every trainer rank runs the same `WeightSync.push` (SPMD); only rank 0 holds the
engines' receiver. For each engine unit (`stream.units`), in layer order, every rank:

1. merges LoRA into the rows of each tensor it holds (`merge.merged_shards`: FSDP2 shards
   dim 0, so rows of 2-D weights and whole experts of fused (E, N, K) tensors);
2. quantizes those rows where the scheme allows it, so that the quantized bytes, not BF16,
   are what the gather moves. Row-wise scales (`fp8_channel`, `int8`) and experts (whole on
   one rank) always allow it; `nvfp4` does, with each unstacked tensor's amax all-reduced
   (max) first, so every rank computes the one global scale the whole tensor would get;
   `fp8_block` does when the row chunk (ceil(N / world)) is a multiple of 128, so no
   128x128 block straddles two ranks. Otherwise the BF16 rows of that one tensor are gathered
   and rank 0 quantizes it whole;
3. passes exempt tensors (norms, router, embeddings, lm_head) through as rows;
4. gathers its part to rank 0 (`gather_named`: names, dtypes and shapes by object gather,
   the bytes as one uint8 buffer per rank), where the parts are concatenated along dim 0 in
   rank order (global scales are equal on every rank and taken once), the deferred tensors
   are quantized, and the norm transform (AQN) is applied to the complete norms.

So rank 0 yields exactly the payloads the single-process path (`stream.encode_unit` on the
whole tensors) yields, byte for byte, and feeds them to the receiver. Every step that all
ranks must take in the same order (the LoRA factor gathers, amax all-reduces, gathers) is
driven by the same walk over the same names, which `union_over_ranks` makes identical.

Left out: sharding the gather's destination (rank 0 receives every layer in turn, one unit
at a time) and overlapping the gather of unit k with the quantization of unit k+1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from qerl_rollout.dist import row_range
from qerl_rollout.quant import SCHEMES, get_scheme
from qerl_rollout.quant.plan import QuantPlan
from qerl_rollout.sync.merge import Shard, merged_shards
from qerl_rollout.wire.stream import NormTransform, Piece, Unit, encode_unit, transform_norms, units

Payload = list[tuple[str, torch.Tensor]]


def union_over_ranks(names: set[str]) -> set[str]:
    """The union of every rank's `names` (each rank fingerprints only its own shards)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(names))
    return set().union(*map(set, everyone))


def first_error_over_ranks(error: tuple[str, str] | None) -> tuple[str, str] | None:
    """The lowest rank's (kind, message), on every rank (so all ranks raise, or none); the
    message names the rank where it came from another one."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, error)
    for rank, found in enumerate(everyone):
        if found is not None:
            kind, message = found
            return kind, message if rank == dist.get_rank() else f"on trainer rank {rank}: {message}"
    return None


def _allreduce_max(amax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Max over ranks of each amax (fp32 on the wire: exact for bf16/fp16 values)."""
    if not amax:
        return amax
    names = sorted(amax)
    stacked = torch.stack([amax[n].float() for n in names])
    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return {n: v.to(amax[n].dtype) for n, v in zip(names, stacked.unbind(0))}


def gather_named(items: Payload, device: torch.device) -> list[Payload] | None:
    """Every rank's `items` on rank 0 (in rank order), None elsewhere; tensors keep their bytes."""
    world = dist.get_world_size()
    meta = [(name, t.dtype, tuple(t.shape)) for name, t in items]
    metas: list = [None] * world
    dist.all_gather_object(metas, meta)
    sizes = [sum(_nbytes(dtype, shape) for _, dtype, shape in m) for m in metas]
    flat = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    offset = 0
    for _, t in items:
        n = t.numel() * t.element_size()
        flat[offset:offset + n] = t.detach().contiguous().reshape(-1).view(torch.uint8)
        offset += n
    rank0 = dist.get_rank() == 0
    received = [torch.empty_like(flat) for _ in range(world)] if rank0 else None
    dist.gather(flat, received, dst=0)
    if not rank0:
        return None
    return [_unflatten(buf, m) for buf, m in zip(received, metas)]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _unflatten(buf: torch.Tensor, meta) -> Payload:
    out, offset = [], 0
    for name, dtype, shape in meta:
        n = _nbytes(dtype, shape)
        out.append((name, buf[offset:offset + n].view(dtype).reshape(shape)))
        offset += n
    return out


def assemble(per_rank: list[Payload]) -> Payload:
    """Rank parts -> whole tensors: concatenated along dim 0 in rank order, except global
    scales, which every rank computed from the same all-reduced amax (checked equal)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for items in per_rank:
        for name, t in items:
            parts.setdefault(name, []).append(t)
    out = []
    for name, ts in parts.items():
        if name.endswith("weight_global_scale"):
            if any(not torch.equal(ts[0], t) for t in ts[1:]):
                raise RuntimeError(f"{name}: trainer ranks computed different global scales")
            out.append((name, ts[0]))
        else:
            out.append((name, ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)))
    return out


def _quantizes_locally(piece: Piece, plan: QuantPlan, scheme: str, world: int) -> bool:
    """Can this rank quantize its rows of `piece` alone? (see module docstring, step 2)"""
    block_rows = get_scheme(scheme).block_rows if scheme in SCHEMES else 1
    if piece.stacked or block_rows == 1:
        return True
    rows = plan[piece.source].shape[0]
    chunk = row_range(rows, 0, world)[1]
    return chunk % block_rows == 0 or chunk >= rows


def _local_pieces(plan: QuantPlan, shards: Iterator[Shard], rank: int, counts: dict) -> Iterator[Piece]:
    for sh in shards:
        if sh.tensor.dim() == 0:   # no rows to split, and the others' empty share has no shape
            raise NotImplementedError(f"{sh.name}: the sharded sync does not carry 0-d trainer tensors "
                                      "(no supported family has one)")
        t = sh.tensor if not sh.replicated or rank == 0 else sh.tensor[:0]   # rank 0 sends it whole
        counts["bytes_bf16"] += torch.Size(plan[sh.name].shape).numel() * t.element_size()
        first_expert = sh.start if sh.name in plan.splits else 0
        for names, chunk in plan.checkpoint_stacks(sh.name, t, first_expert=first_expert):
            if names:
                yield Piece(tuple(names), chunk, sh.name)
            elif not sh.replicated and sh.name in plan.splits:
                raise RuntimeError(f"{sh.name}: this trainer rank holds no experts; use fewer "
                                   "trainer workers than experts")


def sharded_payloads(model, plan: QuantPlan, names: set[str], scheme: str,
                     norm_transform: NormTransform | None, clock, counts: dict) -> Iterator[Payload]:
    """The payloads of a push, unit by unit: complete on rank 0, nothing elsewhere (every rank
    must iterate this to the end: it is a sequence of collectives)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = clock.timed("merge", merged_shards(model, names))
    for unit in units(_local_pieces(plan, shards, rank, counts)):
        local = [p for p in unit.pieces if _quantizes_locally(p, plan, scheme, world)]
        deferred = [p for p in unit.pieces if not _quantizes_locally(p, plan, scheme, world)]
        with clock.phase("quantize"):
            payload = encode_unit(Unit(unit.key, local), plan, scheme, row_amax_reduce=_allreduce_max)
        device = unit.pieces[0].tensor.device
        with clock.phase("gather"):
            encoded = gather_named(payload, device)
            raw = gather_named([(p.names[0], p.tensor) for p in deferred], device) if deferred else None
        if rank != 0:
            continue
        with clock.phase("quantize"):
            whole = assemble(encoded)
            if raw is not None:
                full = [Piece((n,), t, plan.for_checkpoint(n).name) for n, t in assemble(raw)]
                whole += encode_unit(Unit(unit.key, full), plan, scheme)
            whole = transform_norms(whole, plan, norm_transform)
        yield whole
