"""Trainer workers (2 gloo ranks, FSDP2) and engine pools on a real local Ray.

- One training step of 2 `TrainerWorker` ranks equals the single-process `Policy` step: the
  loss and gradient norm to 1e-5 (relative), the updated weights within the AdamW bound of
  `one_step` (the ranks only re-order the fp32 gradient sums).
- A push from the sharded trainer into a 2-engine pool reaches both engines; 2 engines give
  the same samples as 1 engine for the same prompts and seeds (the 1-engine pool is pushed
  through Ray's object store, the 2-engine pool over a gloo group: `workers.collective`). A push into a pool with a dead
  engine names it, and leaves both ranks able to push again (neither waits in a collective).
"""

from __future__ import annotations

import pytest
import ray
from one_step import GRPO, assert_same_adamw_step, batch, policy_config, single_step

from qerl_rollout.config import QuantConfig
from qerl_rollout.layout import Slot, WorkerDiedError
from qerl_rollout.placement.ray import EnginePool
from qerl_rollout.rl.mismatch import MismatchConfig
from qerl_rollout.workers import start_rollout_worker
from qerl_rollout.workers.trainer import RayTrainer

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43], [300, 301]]
SAMPLING = dict(n=4, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trainer(ray_cluster, tiny_qwen3_moe):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(pg.ready())
    t = RayTrainer.start([Slot(0, 1, 0), Slot(1, 1, 0)], pg, policy_config(tiny_qwen3_moe), GRPO,
                         MismatchConfig())
    yield t
    t.close()
    remove_placement_group(pg)


def test_two_ranks_take_the_single_process_step(trainer, tiny_qwen3_moe):
    m1, grads, w1 = single_step(tiny_qwen3_moe)
    m2 = trainer.train_step(*batch())
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    assert m2["response_tokens"] == m1["response_tokens"]
    assert m2["rollout_corr/k3_kl"] == pytest.approx(m1["rollout_corr/k3_kl"], rel=1e-4)
    assert_same_adamw_step(grads, w1, trainer.lora_tensors())


def test_the_step_moved_the_weights(trainer):
    """Guards the comparison above: the 2-rank step changed lora_B (it starts at zero)."""
    lora = trainer.lora_tensors()
    moved = [n for n, t in lora.items() if "lora_B" in n and t.abs().max() > 0]
    assert len(moved) == sum("lora_B" in n for n in lora)


# One OpenMP thread per engine, whatever the driver did before Ray started. A vLLM engine run in
# the driver sets LD_PRELOAD (torch's libgomp) in its environment, which the raylet and so every
# later actor inherit: the engines then decode on 2 threads, and on AMD + zentorch a decode on 2
# threads depends on the batch (measured: 1 vs 2 engines 0.004-0.006 apart in logprob with the
# same tokens, scoring still equal). This test checks the pool's split and seeds, which needs
# batch-invariant kernels: single-threaded ones are (0.0 measured on the same machine).
ONE_THREAD = {"LD_PRELOAD": "", "OMP_NUM_THREADS": "1"}


def _pool(model_dir, n: int) -> EnginePool:
    workers = [start_rollout_worker(model_dir, QuantConfig("fp8_block"), num_cpus=0.5, seed=0,
                                    max_model_len=128, env_vars=ONE_THREAD) for _ in range(n)]
    return EnginePool(workers, [f"engine {i}" for i in range(n)])


def test_two_engines_sample_what_one_engine_samples_after_a_sharded_push(trainer, tiny_qwen3_moe):
    one, two = _pool(tiny_qwen3_moe, 1), _pool(tiny_qwen3_moe, 2)
    try:
        trainer.connect("one", one.workers, "fp8_block", 1 << 20)                       # Ray's object store
        trainer.connect("two", two.workers, "fp8_block", 1 << 20, transport="collective")  # a gloo group
        for target in ("one", "two"):
            report = trainer.push(target)
            assert report.full and report.version == 1
        assert two.receiver.version == 1            # both engines of the pool committed
        a, b = one.generate(PROMPTS, **SAMPLING), two.generate(PROMPTS, **SAMPLING)
        assert [s.prompt_index for s in b] == [i for i in range(len(PROMPTS)) for _ in range(4)]
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        gap = max(abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa.logprobs, sb.logprobs))
        print(f"max |dlogp| 1 vs 2 engines: {gap:.2e}")
        assert gap == 0.0
        assert one.score(PROMPTS, [s.token_ids for s in a[::4]]) == two.score(PROMPTS, [s.token_ids for s in a[::4]])
        # A dead engine is named, and the ranks are left in step: the next push works.
        ray.kill(two.workers[1])
        with pytest.raises(WorkerDiedError, match="engine 1 died"):
            trainer.push("two")
        assert trainer.push("one").version == 2
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("device, cuda, want", [
    ("auto", True, ("cuda", "nccl")), ("auto", False, ("cpu", "gloo")),
    ("cpu", True, ("cpu", "gloo")),          # a CPU policy on a GPU host: gloo, not NCCL on CPU tensors
    ("cuda:0", True, ("cuda:0", "nccl")),
])
def test_the_process_group_backend_follows_the_policys_device(device, cuda, want):
    from qerl_rollout.workers.trainer import process_group_backend, resolve_device

    got = resolve_device(device, cuda)
    assert (got, process_group_backend(got)) == want
