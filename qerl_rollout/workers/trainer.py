"""The trainer in Ray actors: `TrainerWorker` is one FSDP2 rank, `RayTrainer` drives N of them.

How it works.
- `RayTrainer.start(...)` creates N `TrainerWorker` actors in their placement-group bundles,
  asks rank 0 for an address (its node IP and a free port), and has every rank join one
  torch.distributed group there (NCCL when the actor sees a GPU, gloo on CPUs) and build its
  `rl.policy.Policy(distributed=N > 1)`: the same seeded adapters everywhere, sharded with
  FSDP2. With N = 1 the single rank is a plain, unsharded policy.
- `train_step(batch, advantages, logp_rollout)` cuts the global batch into N contiguous row
  blocks (prompt-major, as sampled), sends block i to rank i, and combines the per-rank
  metrics (`rl.policy.combine_rank_metrics`). The loss is normalised by whole-batch counts
  that the ranks all-reduce, so the update is the single-process one (up to reduction order).
- Each rank is a `placement.trainer.PolicyTrainer` (the local placement's trainer too).
- `connect(target, engine_workers, ...)` gives every rank a sharded `WeightSync` for a set of
  engines ("rollout", "baseline"); rank 0 holds the receiver: `RayWeightReceiver` puts each
  bucket into the object store once for all of them, `CollectiveWeightReceiver`
  (`rollout.transport=collective`) sends it to each over a gloo group. `push(target, ...)` runs it on every rank and
  returns rank 0's report; a transport failure is retried once in full, on every rank.
- `save_state(path)` / `load_state(path)`: every rank writes or reads its own shards of the
  checkpoint directory (`Policy.save_state`); the driver passes the path, never the tensors.
  `save_adapter()` and `lora_tensors()` gather the LoRA factors whole on rank 0.
- Every call waits for the ranks in the order they finish; the first rank that failed is
  reported, and a dead actor raises `WorkerDiedError` naming the worker, its pid and node
  (the surviving ranks are then blocked in a collective: `close()` kills them all).
- `to_device(...)` moves a rank's state off and back onto its GPU (colocated placement).

The driver never holds the model; its only torch work is slicing the batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import ray
import torch

from qerl_rollout.layout import Slot, WorkerDiedError
from qerl_rollout.placement.trainer import PolicyTrainer
from qerl_rollout.rl.policy import Policy, TokenBatch, combine_rank_metrics
from qerl_rollout.sync.weight_sync import TransportError
from qerl_rollout.workers.collective import CollectiveWeightReceiver, free_address
from qerl_rollout.workers.transport import RayWeightReceiver

log = logging.getLogger(__name__)


class TrainerWorker(PolicyTrainer):
    """One trainer rank: the shared `placement.trainer.PolicyTrainer` plus what an actor needs
    (its process group, its rendezvous address, its transport). `TrainerWorkerActor` is its
    `ray.remote` form."""

    def __init__(self, rank: int, world: int, num_threads: int = 1):
        super().__init__(rank=rank, world=world)
        torch.set_num_threads(max(1, num_threads))

    def info(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address()}

    def address(self) -> str:
        """host:port for the process group's rendezvous (rank 0 only)."""
        return free_address()

    def setup(self, address: str, policy_cfg, grpo, mismatch) -> None:
        device = resolve_device(policy_cfg.device, torch.cuda.is_available())
        if self.world > 1:
            import torch.distributed as dist

            if device.startswith("cuda"):
                torch.cuda.set_device(0)   # Ray shows each actor its own GPU(s)
            dist.init_process_group(process_group_backend(device), init_method=f"tcp://{address}",
                                    rank=self.rank, world_size=self.world)
        self.policy = Policy(replace(policy_cfg, device=device), grpo, mismatch, distributed=self.world > 1)

    def connect_engines(self, target: str, engine_workers: list, scheme: str, bucket_bytes: int,
                        precision=None, delta: bool = False, transport: str = "object_store") -> None:
        """A sync into these engine actors; rank 0 holds their receiver (`transport`:
        "object_store", `RayWeightReceiver`; "collective", `CollectiveWeightReceiver`). No retry
        inside the sync: `RayTrainer.push` retries a transport failure, on every rank."""
        receiver = None
        if self.rank == 0:
            receiver = (CollectiveWeightReceiver if transport == "collective" else RayWeightReceiver)(engine_workers)
        self.connect(target, receiver, bucket_bytes=bucket_bytes, scheme=scheme, precision=precision, retry=False,
                     delta=delta)


TrainerWorkerActor = ray.remote(TrainerWorker)


def resolve_device(name: str, cuda_available: bool) -> str:
    """`policy.device` for a rank: "auto" is cuda where the actor sees a GPU, else cpu."""
    return ("cuda" if cuda_available else "cpu") if name == "auto" else name


def process_group_backend(device: str) -> str:
    """The trainer group's backend follows the device the model is on, not what the host has:
    NCCL for CUDA tensors, gloo for CPU ones (`policy.device=cpu` on a GPU host included)."""
    return "nccl" if device.startswith("cuda") else "gloo"


def wait_all(refs: list, names: list[str]) -> list:
    """`ray.get` of every ref, in the order they finish: the first failure is raised at once
    (a dead actor as `WorkerDiedError` naming it), not after the ranks it blocked time out."""
    results: list = [None] * len(refs)
    pending = dict(zip(refs, range(len(refs))))
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            results[i] = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            raise WorkerDiedError(f"{names[i]} died: {_cause(e)}") from None
    return results


def _cause(error: Exception) -> str:
    """Ray's first line, plus the underlying exception's line when its creation task raised."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    raised = [line for line in lines[1:] if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return lines[0] if not raised else f"{lines[0]} ({raised[-1]})"


class RayTrainer:
    """N `TrainerWorker` ranks behind the trainer interface the training loop uses."""

    def __init__(self, workers: list, infos: list[dict]):
        self.workers = workers
        self.infos = infos
        self.names = [f"trainer worker {i['rank']} (pid {i['pid']} on {i['node']})" for i in infos]
        self._engines: dict[str, tuple[list, list[str]]] = {}

    @classmethod
    def start(cls, slots: list[Slot], placement_group, policy_cfg, grpo, mismatch) -> RayTrainer:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = len(slots)
        workers = []
        for rank, slot in enumerate(slots):
            strategy = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=slot.bundle)
            workers.append(TrainerWorkerActor.options(
                num_cpus=slot.num_cpus, num_gpus=slot.num_gpus, scheduling_strategy=strategy,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(slot.num_cpus)))}},
            ).remote(rank, world, max(1, int(slot.num_cpus))))
        infos = ray.get([w.info.remote() for w in workers])
        trainer = cls(workers, infos)
        try:
            address = ray.get(workers[0].address.remote())
            trainer._all("setup", address, policy_cfg, grpo, mismatch)
        except BaseException:
            trainer.close()
            raise
        log.info("trainer: %d worker(s): %s", world, "; ".join(trainer.names))
        return trainer

    def _all(self, method: str, *args, **kwargs) -> list:
        return wait_all([getattr(w, method).remote(*args, **kwargs) for w in self.workers], self.names)

    # -- the trainer interface ---------------------------------------------------------------
    def train_step(self, batch: TokenBatch, advantages: torch.Tensor, logp_rollout: torch.Tensor) -> dict:
        bounds = row_blocks(len(batch), len(self.workers))
        refs = [w.train_step.remote(batch.rows(a, b), advantages[a:b], logp_rollout[a:b])
                for w, (a, b) in zip(self.workers, bounds)]
        return combine_rank_metrics(wait_all(refs, self.names))

    def connect(self, target: str, engine_workers: list, scheme: str, bucket_bytes: int,
                names: list[str] | None = None, precision=None, delta: bool = False,
                transport: str = "object_store") -> None:
        """Give every rank a sync into these engines (`names` for errors about them)."""
        self._all("connect_engines", target, engine_workers, scheme, bucket_bytes, precision, delta, transport)
        self._engines[target] = (engine_workers, names or [f"engine {i}" for i in range(len(engine_workers))])

    def push(self, target: str = "rollout", *, noise=None, version: int | None = None,
             full: bool = False, digest: bool = False):
        """Push on every rank; rank 0's report. A transport failure: a dead engine is named
        (`WorkerDiedError`), anything else is retried once in full."""
        try:
            return self._all("push", target, noise=noise, version=version, full=full, digest=digest)[0]
        except TransportError as e:
            workers, names = self._engines[target]
            wait_all([w.process.remote() for w in workers], names)
            log.warning("push to %s failed in transport (%s); re-pushing in full", target, e)
            return self._all("push", target, noise=noise, version=version, full=True, digest=digest)[0]

    def reference_logprobs(self, probe, scheme: str):
        return self._all("reference_logprobs", probe, scheme)[0]

    def save_state(self, path) -> None:
        self._all("save_state", str(path))

    def load_state(self, path) -> None:
        self._all("load_state", str(path))

    def lora_tensors(self) -> dict:
        return self._all("lora_tensors")[0]

    def save_adapter(self, path) -> None:
        self._all("save_adapter", str(path))

    def to_device(self, device: str) -> None:
        self._all("to_device", device)

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []


def row_blocks(rows: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row blocks, sizes differing by at most one (first ones larger)."""
    base, extra = divmod(rows, ranks)
    bounds, start = [], 0
    for r in range(ranks):
        stop = start + base + (r < extra)
        bounds.append((start, stop))
        start = stop
    return bounds
