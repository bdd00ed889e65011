"""RolloutWorker: a Ray actor that owns one `RolloutEngine` (vLLM in-process inside the actor).

How it works.
- `start_rollout_worker(model_dir, quant, ...)` creates the actor with the environment vLLM
  needs set through Ray's `runtime_env`: `VLLM_ENABLE_V1_MULTIPROCESSING=0` (vLLM runs in
  the actor's own process, so weight reloads take tensors directly) and
  `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache on CPU). The actor sets both again before it
  imports vLLM, for actors made with `RolloutWorkerActor.remote` directly.
- The actor exposes the engine's serving calls (`generate`, `score`, `version`) and the
  `WeightReceiver` calls (`begin_update`, `load`, `commit`, `abort`, `manifest`), plus
  `info()`, which returns mode, scheme, version and manifest in one round trip.
- `load` takes a `PackedBucket` (see `transport.py`); pass it as `ray.put(...)` object
  reference and Ray resolves it to zero-copy views of the object store before the call.
  The trainer side of this is `transport.RayWeightReceiver`. With the collective transport
  (`collective.py`) the actor joins the trainer's gloo group once (`join_weight_group`) and
  `receive(layout)` takes each bucket's bytes over it instead.
- Calls run one at a time in submission order (a plain, non-async actor), so a `generate`
  submitted during a push waits for the calls before it and then raises
  `EngineStateError` if the update has not committed.

Placement groups, several engines and tensor parallelism are `placement.ray`'s: an actor
asks for its bundle (`scheduling_strategy`) and vLLM runs its TP ranks as processes on the
GPUs (or cores) the actor was given. `sleep` / `wake_up` serve colocated placements on GPUs.
Left out: restarting a dead actor (the run stops and says which one died).
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

from qerl_rollout.rollout.engine import engine_env, set_engine_env
from qerl_rollout.rollout.types import QuantConfig, Sample
from qerl_rollout.wire.bucket import BucketLayout
from qerl_rollout.workers.transport import PackedBucket, unpack_bucket


class RolloutWorker:
    """Plain class behind the actor; `RolloutWorkerActor` is its `ray.remote` form."""

    def __init__(self, model_dir: str | Path, quant: QuantConfig | None = None, *,
                 seed: int = 0, max_model_len: int = 1024, **engine_options):
        set_engine_env()
        from qerl_rollout.rollout.engine import RolloutEngine  # imports vLLM lazily

        self.engine = RolloutEngine(model_dir, quant, seed=seed, max_model_len=max_model_len,
                                    **engine_options)
        self._weight_group = None   # `join_weight_group`: the collective transport's

    def process(self) -> dict:
        """This actor's pid and node (for naming it in errors and workers.json)."""
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}

    def sleep(self) -> None:
        self.engine.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.wake_up(tags)

    def info(self) -> dict:
        e = self.engine
        return {"mode": e.mode, "scheme": e.scheme, "precision": e.precision, "version": e.version,
                "manifest": e.manifest()}

    # -- serving ---------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[list[int]], **sampling) -> list[Sample]:
        return self.engine.generate(prompt_token_ids, **sampling)

    def score(self, prompt_token_ids: list[list[int]],
              response_token_ids: list[list[int]]) -> list[list[float]]:
        return self.engine.score(prompt_token_ids, response_token_ids)

    def version(self) -> int:
        return self.engine.version

    # -- WeightReceiver --------------------------------------------------------------------
    def manifest(self) -> dict:
        return self.engine.manifest()

    def begin_update(self, version: int, digest: bool = False, delta: bool = False) -> None:
        self.engine.begin_update(version, digest, delta)

    def received_digests(self) -> dict[str, str] | None:
        return self.engine.received_digests()

    def load(self, packed: PackedBucket) -> None:
        self.engine.load(unpack_bucket(packed))

    def join_weight_group(self, address: str, rank: int, world: int, timeout_s: float) -> None:
        """Join the trainer's weight group (`collective.CollectiveWeightReceiver`), replacing
        any earlier one."""
        from qerl_rollout.workers.collective import weight_group, weight_store

        self._weight_group = None
        self._weight_group = weight_group(weight_store(address, rank, world, timeout_s), rank, world, timeout_s)

    def receive(self, layout: BucketLayout) -> None:
        """A bucket over the weight group: received first (the trainer's send never waits on
        an engine error), then loaded."""
        from qerl_rollout.workers.collective import receive_bucket

        if self._weight_group is None:
            raise RuntimeError("no weight group to receive from: join_weight_group first")
        try:
            bucket = receive_bucket(self._weight_group, layout)
        except RuntimeError:
            self._weight_group = None       # the trainer forms a new group after a failed send
            raise
        self.engine.load(bucket)

    def commit(self, version: int) -> None:
        self.engine.commit(version)

    def abort(self, reason: str) -> None:
        self.engine.abort(reason)


RolloutWorkerActor = ray.remote(RolloutWorker)


def start_rollout_worker(model_dir: str | Path, quant: QuantConfig | None = None, *,
                         num_cpus: float = 1, num_gpus: float = 0, kv_cache_gib: float = 1,
                         env_vars: dict[str, str] | None = None, scheduling_strategy=None,
                         **engine_kwargs):
    """Create a `RolloutWorker` actor (returns at once; the engine starts in the actor).

    `scheduling_strategy`: e.g. a placement-group bundle (`placement.ray`).
    """
    env = {**engine_env(kv_cache_gib), **(env_vars or {})}
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": env}}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return RolloutWorkerActor.options(**options).remote(str(model_dir), quant, **engine_kwargs)
