"""Weight transport from the trainer process to a `RolloutWorker` actor through Ray's object store.

How it works.
- Packing. A bucket (`[(name, tensor), ...]`, whole engine layers, as `wire.bucket` cuts them)
  becomes a `PackedBucket`: per tensor its name, dtype, shape and a flat `uint8` numpy view
  of its bytes. Ray pickles numpy arrays with protocol-5 out-of-band buffers, so `ray.put`
  copies each array once into shared memory and the actor reads it back without a copy
  (the arrays it gets are read-only views of the object store). The uint8 view is what
  makes every dtype travel: numpy has no bfloat16 or float8, and Ray's default for a torch
  tensor pickles its storage (a copy; with ray 2.60 + torch 2.13 a float8_e4m3fn tensor
  then fails to unpickle: "UntypedStorage has no attribute dtype"). Ray's opt-in
  `RAY_ENABLE_ZERO_COPY_TORCH_TENSORS` does the same uint8 trick, but process-wide and
  with a warning on every tensor; doing it here keeps it explicit and scoped to buckets. Unpacking reinterprets the bytes (`view(dtype).reshape(shape)`), so the
  round trip is bit-exact for every dtype, NaN payloads and -0.0 included.
  Tensors are detached and made contiguous on the CPU before packing; a GPU tensor is copied
  to the host here (see "GPU transports" below for the path that avoids that).
- `RayWeightReceiver(worker)` (or a list of workers: data-parallel engines, each bucket put
  into the object store once for all) is the trainer-side `WeightReceiver` for `RolloutWorker`
  actors, so `WeightSync(RayWeightReceiver(worker)).push(model)` works unchanged. It fetches
  `mode`, `scheme` and `manifest()` once on construction; `version` asks the actor each
  time (actor calls run in order, so it is the version after every call already sent).
- Pipelining. `load(bucket)` puts bucket k into the object store, then waits for bucket
  k-1's load to finish, then submits k and returns; WeightSync merges and requantizes
  bucket k+1 while the actor loads k. At most one bucket is loading and one more is being
  prepared or stored, so the object store holds at most two buckets of a push. `commit`
  first waits for the last load. A failure in the actor's `load` therefore surfaces on the
  trainer at the next `load` or at `commit` (as Ray's `RayTaskError`, which is also an
  instance of the actor's exception class; WeightSync raises it as a `TransportError`, which
  it retries once in full unless told not to); WeightSync then calls `abort`, which drains the
  in-flight load and tells the engine, which refuses to generate until a push commits.

GPU transports (design only; nothing below is implemented or tested here, where there is
no GPU). They plug in as other `WeightReceiver`s beside this one, so WeightSync and the
worker's engine side (`begin_update` / `load` / `commit` / `abort`) stay as they are:
- Colocated trainer and engine on one GPU (or one node): `CudaIpcWeightReceiver` would
  send, per bucket, CUDA IPC handles of the trainer-side quantized tensors
  (`torch.multiprocessing.reductions.reduce_tensor`) instead of bytes; the worker opens
  them, calls the engine's `load`, and acknowledges so the trainer can free the bucket.
  The handles are small, so they can travel as plain Ray call arguments. Needs both
  processes to see the same device and the bucket kept alive until the acknowledgement.
- Across nodes: a `NcclWeightReceiver` would broadcast each bucket over a NCCL group
  formed between the trainer rank and the engine's worker ranks (vLLM's weight-transfer
  engine / `StatelessProcessGroup` + `PyNcclCommunicator`, as verl and NeMo RL do), with
  the names, dtypes and shapes sent ahead through Ray and the engine receiving into
  preallocated buffers. Ray's `@ray.method(tensor_transport="nccl")` is an alternative
  that keeps tensors out of the object store.
In both, the TP engine's every rank must receive its shard (see the engine's "left out").

Left out: compression on the wire (buckets already carry FP8/NVFP4 payloads), and
retrying a single bucket (WeightSync retries the whole push).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch

Bucket = Sequence[tuple[str, torch.Tensor]]


@dataclass
class PackedBucket:
    """A bucket as Ray can move it without copies: raw bytes per tensor plus dtype and shape."""

    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[tuple[int, ...]]
    data: list[np.ndarray]      # flat uint8 views of each tensor's bytes

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.data)


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def pack_bucket(named_tensors: Bucket) -> PackedBucket:
    """Trainer side: tensors -> `PackedBucket` (no copy for contiguous CPU tensors)."""
    names = [name for name, _ in named_tensors]
    if len(set(names)) != len(names):
        raise ValueError("a bucket names a tensor twice")
    return PackedBucket(names,
                        [t.dtype for _, t in named_tensors],
                        [tuple(t.shape) for _, t in named_tensors],
                        [_bytes_of(t) for _, t in named_tensors])


def unpack_bucket(packed: PackedBucket) -> list[tuple[str, torch.Tensor]]:
    """Engine side: `PackedBucket` -> tensors viewing the same bytes (read-only after Ray).

    The tensors alias the object store's read-only memory; the engine only reads them (vLLM
    copies loaded weights into its parameters), so no copy is made.
    """
    out = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, dtype, shape, arr in zip(packed.names, packed.dtypes, packed.shapes, packed.data):
            out.append((name, torch.from_numpy(arr).view(dtype).reshape(shape)))
    return out


class RayWeightReceiver:
    """A `WeightReceiver` (structurally) driving one or several `RolloutWorker` actors.

    With several engines (data-parallel rollout), each bucket is put into the object store
    once and every engine loads the same object; every call waits for all of them. The engines
    must serve the same model, scheme and mode (checked on construction) and stay at one
    version. See the module docstring for the pipelining.
    """

    def __init__(self, workers: ray.actor.ActorHandle | Sequence[ray.actor.ActorHandle]):
        self.workers = list(workers) if isinstance(workers, (list, tuple)) else [workers]
        infos = ray.get([w.info.remote() for w in self.workers])
        first = infos[0]
        for i, info in enumerate(infos[1:], 1):
            if (info["mode"], info["scheme"], info["precision"], info["manifest"]) != (
                    first["mode"], first["scheme"], first["precision"], first["manifest"]):
                raise ValueError(f"engine {i} serves {info['scheme']}/{info['mode']} or another model "
                                 f"than engine 0 ({first['scheme']}/{first['mode']})")
        self.mode: str = first["mode"]
        self.scheme: str = first["scheme"]
        self.precision = first["precision"]
        self._manifest = first["manifest"]
        self._in_flight: list[ray.ObjectRef] = []

    @property
    def worker(self) -> ray.actor.ActorHandle:
        return self.workers[0]

    @property
    def version(self) -> int:
        versions = set(ray.get([w.version.remote() for w in self.workers]))
        if len(versions) != 1:
            raise RuntimeError(f"the engines serve different weight versions: {sorted(versions)}")
        return versions.pop()

    def manifest(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._manifest)

    def begin_update(self, version: int, digest: bool = False, delta: bool = False) -> None:
        self._drain(raise_errors=False)
        ray.get([w.begin_update.remote(version, digest, delta) for w in self.workers])

    def received_digests(self) -> list[dict[str, str] | None]:
        """One dict per engine: each must match what was sent."""
        return ray.get([w.received_digests.remote() for w in self.workers])

    def load(self, named_tensors: Bucket) -> None:
        ref = ray.put(pack_bucket(named_tensors))   # stored once, while the previous bucket loads
        self._drain(raise_errors=True)
        self._in_flight = [w.load.remote(ref) for w in self.workers]

    def commit(self, version: int) -> None:
        self._drain(raise_errors=True)
        ray.get([w.commit.remote(version) for w in self.workers])

    def abort(self, reason: str) -> None:
        self._drain(raise_errors=False)
        ray.get([w.abort.remote(reason) for w in self.workers])

    def _drain(self, raise_errors: bool) -> None:
        """Wait for the bucket in flight on every engine; the first error is raised once (or
        dropped on abort)."""
        pending, self._in_flight = self._in_flight, []
        errors = []
        for ref in pending:
            try:
                ray.get(ref)
            except Exception as e:
                errors.append(e)
        if errors and raise_errors:
            raise errors[0]
