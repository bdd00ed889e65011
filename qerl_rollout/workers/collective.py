"""Weight transport from the trainer to `RolloutWorker` actors over a gloo process group
(`rollout.transport=collective`): bytes go from the trainer's process straight into each
engine's, with no object store in between.

How it works.
- Group. `CollectiveWeightReceiver(workers)` lives on the trainer's rank 0. At the first
  `begin_update` it opens a TCP store on its own node (its IP, a free port) and every engine
  actor joins (`RolloutWorker.join_weight_group`): one gloo group of 1 + M ranks, the trainer
  rank 0 and engine i rank i + 1. The store binds before any engine is asked to join (a
  taken port fails there, at once). The group is a bare `ProcessGroupGloo` on that store
  (`weight_store`, `weight_group`), apart from the trainer's own FSDP2 group and from vLLM's,
  so neither side needs a default group and neither group sees the other.
- Bucket. `load(bucket)` lays the bucket's bytes in one buffer (`wire.bucket.flatten`: one
  copy, overlapping the engines' load of the previous bucket), waits until every engine has
  loaded that previous bucket, sends each engine the layout (names, dtypes, shapes, offsets:
  a Ray call, `RolloutWorker.receive`) and the buffer (a gloo send per engine, all in flight
  at once). The engine receives into a buffer of its own and loads views of it, while the
  trainer merges and requantizes the next bucket: the object store path's pipelining.
- Why a send per engine and not one broadcast: with a broadcast, an engine that dies halfway
  leaves the others waiting for bytes that never come until the group's timeout (measured:
  gloo's broadcast root fails at once, the other receivers wait out the timeout, and aborting
  the root's group does not wake them). With sends, every live engine gets the whole bucket
  and only the send to the dead one fails, at once ("Connection closed by peer"); the
  trainer raises a `TransportError` naming the engine ranks that failed, and drops the group.
  The next `begin_update` forms a new one, so WeightSync's retry in full goes through a fresh
  group, and a dead engine fails it by name in Ray (`RayTrainer.push`).
- An engine receives before anything in it can fail (`receive` joins the send first, then
  loads), so an engine's error never leaves the trainer waiting; it surfaces at the next
  `load` or at `commit`, as on the object store path. A live engine that never answers is
  an error after `timeout_s` on both ends.
- Every other call (`begin_update`, `commit`, `abort`, `version`, digests) is the object store
  receiver's (`transport.RayWeightReceiver`): small Ray calls in order with the loads.

What is sent where. Only rank 0 of a sharded trainer sends (after `sync.sharded` gathered
the quantized rows to it); the other trainer ranks are not in the group. Sending each rank's
rows straight to the engines would need the engines to assemble tensors (concatenate rows,
take NVFP4's global scale once, quantize the `fp8_block` tensors whose rows straddle 128-row
blocks) and is not built. A tensor-parallel engine receives in its driver process (the actor)
and vLLM moves the shards to its TP ranks, as on the object store path.

Left out: NCCL (GPU tensors are copied to the host before the send, as on the object store
path; a NCCL group between the trainer's GPU and the engines' would skip that copy and is
untested here, where there is no GPU) and CUDA IPC for engines on the trainer's GPU (see
`transport.py`, "GPU transports").
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from qerl_rollout.sync.weight_sync import TransportError
from qerl_rollout.wire.bucket import BucketLayout, flatten, unflatten
from qerl_rollout.workers.transport import RayWeightReceiver

TIMEOUT_S = 300.0   # a live peer that never answers; a dead one fails at once
_TAG = 0


def free_address() -> str:
    """This node's IP and a port free now (bound and released: another process could take it
    before the store does, as with any rendezvous by port). Also the trainer group's address."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


def weight_store(address: str, rank: int, world: int, timeout_s: float = TIMEOUT_S) -> dist.Store:
    """The group's rendezvous: rank 0 binds `address` (at once: a taken port fails here, before
    any engine is asked to join), the others connect to it, retrying until `timeout_s`."""
    host, port = address.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world, rank == 0, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return dist.PrefixStore("qerl_weights", store)


def weight_group(store: dist.Store, rank: int, world: int, timeout_s: float = TIMEOUT_S) -> dist.ProcessGroup:
    """A gloo group of `world` ranks meeting at `store`; returns once all of them have joined.
    Not registered with torch.distributed: use its methods (`send`, `recv`), not `dist.send`."""
    return dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=timeout_s))


def receive_bucket(group: dist.ProcessGroup, layout: BucketLayout) -> list[tuple[str, torch.Tensor]]:
    """Engine side: the bucket rank 0 sends, as views of a buffer of this process's own."""
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    if layout.nbytes:
        group.recv([buffer], 0, _TAG).wait()
    return unflatten(layout, buffer)


class CollectiveWeightReceiver(RayWeightReceiver):
    """A `WeightReceiver` sending buckets to `RolloutWorker` actors over a gloo group (see the
    module docstring); the rest of the protocol is `RayWeightReceiver`'s."""

    def __init__(self, workers: ray.actor.ActorHandle | Sequence[ray.actor.ActorHandle],
                 timeout_s: float = TIMEOUT_S):
        super().__init__(workers)
        self.timeout_s = timeout_s
        self._group: dist.ProcessGroup | None = None

    def begin_update(self, version: int, digest: bool = False, delta: bool = False) -> None:
        super().begin_update(version, digest, delta)
        if self._group is None:
            self._group = self._form_group()

    def _form_group(self) -> dist.ProcessGroup:
        address, world = free_address(), 1 + len(self.workers)
        store = weight_store(address, 0, world, self.timeout_s)
        joins = [w.join_weight_group.remote(address, rank, world, self.timeout_s)
                 for rank, w in enumerate(self.workers, 1)]
        group = weight_group(store, 0, world, self.timeout_s)
        ray.get(joins)
        return group

    def load(self, named_tensors) -> None:
        if self._group is None:
            raise TransportError("no weight group: begin_update first")
        layout, buffer = flatten(named_tensors)      # while the engines load the previous bucket
        self._drain(raise_errors=True)
        self._in_flight = [w.receive.remote(layout) for w in self.workers]
        if layout.nbytes:
            self._send(buffer)

    def _send(self, buffer: torch.Tensor) -> None:
        """One send per engine, all in flight; every live engine gets the whole buffer. A send
        to a closed peer fails when posted or while it waits: either way the others finish."""
        works, failed = [], []
        for rank in range(1, len(self.workers) + 1):
            try:
                works.append((rank, self._group.send([buffer], rank, _TAG)))
            except RuntimeError as e:
                failed.append((rank, e))
        for rank, work in works:
            try:
                work.wait()
            except RuntimeError as e:
                failed.append((rank, e))
        if failed:
            self._group = None          # a peer is gone: the next update forms a new group
            raise TransportError("weight send failed to " + "; ".join(
                f"engine {rank - 1}: {str(e).splitlines()[0]}" for rank, e in sorted(failed, key=lambda f: f[0])))
