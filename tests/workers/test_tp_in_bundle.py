"""A TP engine under Ray keeps its TP workers in its own bundle.

vLLM chooses its executor when the engine is built: inside a Ray placement group, with nothing
said, it picks its Ray executor, which schedules the TP workers on the group's bundles from
the first one, the trainer's GPUs (expected on a GPU node: a hang or an out-of-memory). The
engine options the placement gives (`placement.ray.tensor_parallel_options`) say "mp": the TP
ranks are the actor's own processes, on the GPUs Ray gave the actor. The choice is vLLM's own
`ParallelConfig`, made here in a task inside a placement group (no engine, no GPU needed).
"""

from __future__ import annotations

import pytest
import ray

from qerl_rollout.placement.ray import tensor_parallel_options


@pytest.fixture(scope="module")
def group():
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(pg.ready(), timeout=120)
    yield pg
    remove_placement_group(pg)
    ray.shutdown()


@ray.remote(num_cpus=1)
def executor_vllm_picks(options: dict) -> str:
    from vllm.config import ParallelConfig

    return ParallelConfig(**options).distributed_executor_backend


def _in_bundle(group, bundle: int, options: dict) -> str:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
    return ray.get(executor_vllm_picks.options(scheduling_strategy=strategy).remote(options))


def test_a_tp_engine_in_a_placement_group_runs_its_ranks_itself(group):
    assert _in_bundle(group, 1, {"tensor_parallel_size": 2}) == "ray"      # the failure mode
    assert _in_bundle(group, 1, tensor_parallel_options(2)) == "mp"
    assert tensor_parallel_options(1) == {}
