"""Placing a run on Ray: the cluster, the placement group, the trainer workers and the engines.

How it works. `RayPlacement(cfg, model_dir, ...)` joins the cluster `placement.ray_address`
names (`auto`: the running one) or starts a local one, checks the layout against the model
and the cluster (`qerl_rollout.layout.plan_layout`: one line if it cannot work, before any
actor starts), reserves one placement group holding every bundle, and starts in it:

- `trainer`: a `workers.trainer.RayTrainer` of `trainer.num_workers` FSDP2 ranks;
- `rollout`: an `EnginePool` of `rollout.num_engines` `RolloutWorker` actors, each a vLLM
  engine with `rollout.tensor_parallel_size` (vLLM shards the pushed tensors itself);
- `baseline`: a one-engine BF16 `EnginePool` when the run measures against BF16.

`EnginePool.generate` splits the prompts into contiguous blocks, one per engine, and returns
the samples prompt-major with global prompt indices: every engine got the same seed, and the
block starting at prompt `a` is sampled with seed `seed + a * n`, so prompt i's samples draw
from the streams one engine would give it (`RolloutEngine.generate`: `seed + i * n + k`; a
prompt's samples do not depend on which other prompts share its batch up to the engine's
numerics). Pushes go through one receiver over all engines of a pool (`rollout.transport`,
`resolve_transport`): `RayWeightReceiver` puts each bucket into the object store once,
`CollectiveWeightReceiver` sends it to each engine over a gloo group.

Colocated placement (`phase(name)` before each phase of a step, `placement.phases`): on
GPUs the engines sleep (vLLM sleep mode level 1: weights to host memory, KV cache dropped)
before the trainer returns for "train"; for "push" they wake their weights alone (the trainer
is still on its GPU: merged, quantized tensors go straight into the engine); for "rollout" the
trainer's parameters and optimizer state move to host memory, its allocator cache is emptied,
and then the KV cache wakes. vLLM-CPU has no sleep mode, so on CPUs both stay resident (logged
once) and no phase moves anything.

`close()` kills every actor and removes the placement group; a Ray it started is shut down.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import ray

from qerl_rollout.config import QuantConfig
from qerl_rollout.layout import Layout, LayoutError, Slot, plan_layout
from qerl_rollout.placement.phases import ColocatedPhases, check_phase
from qerl_rollout.quant.plan import Precision
from qerl_rollout.rollout.types import Sample
from qerl_rollout.workers.rollout_worker import start_rollout_worker
from qerl_rollout.workers.trainer import RayTrainer, row_blocks, wait_all
from qerl_rollout.workers.transport import RayWeightReceiver

log = logging.getLogger(__name__)


def init_ray(ray_address: str, local_cpus: float) -> None:
    """Join `ray_address` (or, in a Ray job, `RAY_ADDRESS`), else start a local cluster.

    The local one is asked for explicitly (`address="local"`): with no address Ray would first
    look for `/tmp/ray/ray_current_cluster`, which a `ray start --head` ended by its pid leaves
    behind, and then refuse `num_cpus` ("When connecting to an existing cluster, num_cpus and
    num_gpus must not be provided"). An address that does not answer is one line.
    """
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(address="local", num_cpus=local_cpus, include_dashboard=False, log_to_driver=False)
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as e:
        raise LayoutError(f"no Ray cluster answers at {address!r} (placement.ray_address or "
                          f"RAY_ADDRESS): {str(e).splitlines()[0]}") from None


@contextmanager
def local_ray(num_cpus: float):
    """A local Ray cluster for the `with` block (benchmarks, tools), shut down after it."""
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


class EnginePool:
    """M rollout engines in Ray actors behind one `generate` / `score` / `receiver`."""

    def __init__(self, workers: list, names: list[str], nodes: list[str] | None = None):
        self.workers, self.names, self.nodes = workers, names, nodes or []
        try:
            self.receiver = RayWeightReceiver(workers)   # waits for every engine to be ready
        except ray.exceptions.RayActorError as e:
            self.close()
            raise RuntimeError(f"a rollout engine failed to start: {e}") from None

    def generate(self, prompt_token_ids: list[list[int]], **sampling) -> list[Sample]:
        blocks = _blocks(len(prompt_token_ids), len(self.workers))
        refs = [w.generate.remote(prompt_token_ids[a:b], **_block_seed(sampling, a))
                for w, (a, b) in zip(self.workers, blocks)]
        samples = []
        for (start, _), part in zip(blocks, wait_all(refs, self.names)):
            samples += [replace(s, prompt_index=s.prompt_index + start) for s in part]
        return samples

    def score(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[list[float]]:
        blocks = _blocks(len(prompt_token_ids), len(self.workers))
        refs = [w.score.remote(prompt_token_ids[a:b], response_token_ids[a:b])
                for w, (a, b) in zip(self.workers, blocks)]
        return [lp for part in wait_all(refs, self.names) for lp in part]

    def score_each(self, prompt_token_ids: list[list[int]],
                   response_token_ids: list[list[int]]) -> list[list[list[float]]]:
        """Every engine scores all of them (a push check looks at each engine)."""
        return wait_all([w.score.remote(prompt_token_ids, response_token_ids) for w in self.workers],
                        self.names)

    def sleep(self) -> None:
        wait_all([w.sleep.remote() for w in self.workers], self.names)

    def wake_up(self, tags: list[str] | None = None) -> None:
        wait_all([w.wake_up.remote(tags) for w in self.workers], self.names)

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []


def _blocks(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous prompt blocks, one per engine; with fewer prompts than engines the last
    engines get none (an engine refuses an empty request)."""
    return row_blocks(n, max(1, min(parts, n)))


def tensor_parallel_options(tp: int) -> dict:
    """vLLM options of a TP engine in an actor: its TP ranks are processes of the actor
    (`distributed_executor_backend="mp"`), on the GPUs (or cores) of the actor's own bundle.
    Left to choose, vLLM sees the actor inside a placement group and picks its Ray executor,
    which places the TP workers on the group's bundles from the first one: the trainer's GPUs
    (`tests/workers/test_tp_in_bundle.py` shows vLLM 0.32's choice)."""
    return {} if tp == 1 else {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"}


def _block_seed(sampling: dict, first: int) -> dict:
    """The sampling arguments of the block starting at prompt `first`: its seed moved on by
    the streams of the prompts before it (`RolloutEngine.generate`: `seed + i * n + k`)."""
    if sampling.get("seed") is None:
        return sampling
    return {**sampling, "seed": sampling["seed"] + first * sampling.get("n", 1)}


class RayPlacement:
    """Trainer workers and engines of one run in one placement group (see module docstring)."""

    def __init__(self, cfg, model_dir: Path, run_dir: Path, policy_cfg, grpo, *, with_baseline: bool,
                 engine_options: dict):
        from ray.util.placement_group import placement_group, remove_placement_group

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self._owns_ray = not ray.is_initialized()
        self._pg = self._phases = None
        self.trainer = self.rollout = self.baseline = None
        self._remove_pg = remove_placement_group
        try:
            self.layout = self._plan(cfg, model_dir, with_baseline)
            log.info("placement %s", self.layout.describe())
            self._pg = placement_group(self.layout.bundles, strategy="PACK")
            ray.get(self._pg.ready(), timeout=600)
            self.trainer = RayTrainer.start(self.layout.trainers, self._pg, policy_cfg, grpo, cfg.mismatch)
            self.rollout = self._engines(model_dir, self.layout.engines, cfg.rollout.scheme, engine_options)
            self.transport = resolve_transport(cfg.rollout.transport, self.trainer.infos[0]["node"],
                                               self.rollout.nodes)
            log.info("weights travel to the engines by %s", self.transport)
            self.trainer.connect("rollout", self.rollout.workers, cfg.rollout.scheme, cfg.rollout.bucket_mb << 20,
                                 self.rollout.names, cfg.rollout.precision, delta=cfg.sync.delta,
                                 transport=self.transport)
            if self.layout.baseline is not None:
                self.baseline = self._engines(model_dir, [self.layout.baseline], "bf16",
                                              {**engine_options, "return_routes": False}, name="baseline engine")
                self.trainer.connect("baseline", self.baseline.workers, "bf16", cfg.rollout.bucket_mb << 20,
                                     self.baseline.names, delta=cfg.sync.delta,
                                     transport=resolve_transport(cfg.rollout.transport, self.trainer.infos[0]["node"],
                                                                 self.baseline.nodes))
            self._write_workers(run_dir)
        except BaseException:
            self.close()
            raise
        colocated = self.layout.mode == "colocated"
        self._phases = ColocatedPhases(self.trainer, self.rollout) if colocated and self.layout.use_gpus else None
        if colocated and not self.layout.use_gpus:
            log.warning("colocated on CPUs: vLLM-CPU has no sleep mode, so engines and trainer "
                        "workers stay resident side by side")

    def _plan(self, cfg, model_dir: Path, with_baseline: bool) -> Layout:
        model_config = json.loads((Path(model_dir) / "config.json").read_text())
        if not ray.is_initialized():
            probe = plan_layout(cfg, model_config, {"CPU": float("inf"), "GPU": float("inf")}, with_baseline)
            # A local cluster gets the logical CPUs the layout asks for, even on a small machine.
            init_ray(cfg.placement.ray_address, max(probe.needs("CPU"), float(os.cpu_count() or 1)))
        return plan_layout(cfg, model_config, _cluster_resources(), with_baseline)

    def _engines(self, model_dir, slots: list[Slot], scheme: str, options: dict, name="engine") -> EnginePool:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from qerl_rollout.rollout.engine import prepare_export, vllm_logging_env

        r = self.cfg.rollout
        quant = QuantConfig(scheme, r.mode, r.precision if scheme == r.scheme else Precision())
        # Made here, once, before any engine starts: engines only load it.
        export_dir = prepare_export(model_dir, quant, engines_on_gpu=any(s.num_gpus > 0 for s in slots))
        extra = dict(options, export_dir=None if export_dir is None else str(export_dir))
        extra.update(tensor_parallel_options(r.tensor_parallel_size))
        if self.layout.mode == "colocated" and self.layout.use_gpus:
            extra["enable_sleep_mode"] = True
        # Each engine's vLLM logs go to the run directory (Ray keeps actor output off the console).
        logs = [self.run_dir / f"vllm.{name.replace(' ', '-')}-{i}.log" for i in range(len(slots))]
        workers = [start_rollout_worker(
            model_dir, quant, num_cpus=s.num_cpus, num_gpus=s.num_gpus, kv_cache_gib=r.kv_cache_gib,
            env_vars=vllm_logging_env(log),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=s.bundle),
            **extra) for s, log in zip(slots, logs)]
        infos = wait_all([w.process.remote() for w in workers], [f"{name} {i}" for i in range(len(workers))])
        names = [f"{name} {i} (pid {info['pid']} on {info['node']})" for i, info in enumerate(infos)]
        return EnginePool(workers, names, [info["node"] for info in infos])

    def _write_workers(self, run_dir: Path) -> None:
        """run_dir/workers.json: every actor's pid and node (to find or kill one)."""
        rows = {"trainer": self.trainer.infos, "rollout": self.rollout.names,
                "baseline": self.baseline.names if self.baseline else []}
        (Path(run_dir) / "workers.json").write_text(json.dumps(rows, indent=1))

    def phase(self, name: str) -> None:
        """Colocated on GPUs: the moves into "train", "push" or "rollout" (`placement.phases`);
        elsewhere nothing moves."""
        check_phase(name)
        if self._phases is not None:
            self._phases.enter(name)

    def close(self) -> None:
        for part in (self.baseline, self.rollout, self.trainer):
            if part is not None:
                part.close()
        if self._pg is not None:
            self._remove_pg(self._pg)
            self._pg = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


def resolve_transport(name: str, sender_node: str, engine_nodes: list[str]) -> str:
    """`rollout.transport`; "auto": the object store where every engine shares trainer rank 0's
    node (shared memory: measured faster there than the gloo group, 0.42 against 0.61 s for a
    430 MB push into 1 engine, 0.56 against 0.98 s into 2; README "Transports"), the gloo
    group (`workers.collective`) where some engine is on another node (one copy on each end,
    instead of the object store's per-node copies; not measured: no second node here)."""
    if name != "auto":
        return name
    return "object_store" if all(node == sender_node for node in engine_nodes) else "collective"


def _cluster_resources() -> dict[str, float]:
    resources = ray.cluster_resources()
    gpus_per_node = [n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    return {"CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0),
            "max_gpus_per_node": max(gpus_per_node, default=0.0)}
