"""Placing the rollout engine: in a Ray actor, behind the calls the training loop makes.

`RayRollout` starts (or joins) a Ray cluster, creates a `RolloutWorker` actor with the
engine inside it, and offers what the controller needs from any rollout placement:
`generate(...) -> list[Sample]`, `score(prompts, responses)`, `receiver` (the `WeightReceiver` a `WeightSync` pushes
into; here through the object store) and `close()`. The in-process twin is
`train.LocalRollout`. Left out: several rollout actors (data-parallel engines) and GPU
colocation of trainer and engine (`sleep`/`wake_up` between phases); both go here.
"""

from __future__ import annotations

from pathlib import Path

import ray

from qerl_rollout.config import QuantConfig
from qerl_rollout.rollout.types import Sample
from qerl_rollout.workers.rollout_worker import start_rollout_worker
from qerl_rollout.workers.transport import RayWeightReceiver


class RayRollout:
    def __init__(self, model_dir: str | Path, quant: QuantConfig, *, address: str = "",
                 num_cpus: float = 1, num_gpus: float = 0, kv_cache_gib: float = 1,
                 **engine_kwargs):
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
        self.worker = None
        try:
            self.worker = start_rollout_worker(model_dir, quant, num_cpus=num_cpus,
                                               num_gpus=num_gpus, kv_cache_gib=kv_cache_gib,
                                               **engine_kwargs)
            self.receiver = RayWeightReceiver(self.worker)   # waits for the engine to be ready
        except BaseException:
            self.close()
            raise

    def generate(self, prompt_token_ids: list[list[int]], **sampling) -> list[Sample]:
        return ray.get(self.worker.generate.remote(prompt_token_ids, **sampling))

    def score(self, prompt_token_ids: list[list[int]],
              response_token_ids: list[list[int]]) -> list[list[float]]:
        return ray.get(self.worker.score.remote(prompt_token_ids, response_token_ids))

    def close(self) -> None:
        if self.worker is not None:
            ray.kill(self.worker)
            self.worker = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
