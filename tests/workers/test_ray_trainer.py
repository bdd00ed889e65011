"""Trainer workers (2 gloo ranks, FSDP2) and engine pools on a real local Ray.

- One training step of 2 `TrainerWorker` ranks equals the single-process `Policy` step. The
  forward of every row is the same BF16 arithmetic on the same gathered weights; what differs
  is the order in which fp32 gradients are summed (two ranks' partial sums, reduce-scattered
  by gloo). Measured: gradients differ by ~3e-7 of their largest entry. The loss must agree
  to 1e-5 (relative) and the global gradient norm too. AdamW's first step moves each weight
  by lr * g / (|g| + eps), about lr * sign(g), so the updated weights are compared against
  the bound that step puts on a gradient error of DELTA (1e-6 of the largest entry), entry by
  entry, wherever |g| is clear of that error (entries within it may flip the sign of their
  update); those entries must be almost all of them (> 99%).
- A push from the sharded trainer into a 2-engine pool reaches both engines; 2 engines give
  the same samples as 1 engine for the same prompts and seeds. A push into a pool with a dead
  engine names it, and leaves both ranks able to push again (neither waits in a collective).
"""

from __future__ import annotations

import pytest
import ray
import torch

from qerl_rollout.config import QuantConfig
from qerl_rollout.layout import Slot, WorkerDiedError
from qerl_rollout.rl.grpo import GRPOConfig
from qerl_rollout.rl.policy import Policy, PolicyConfig, TokenBatch
from qerl_rollout.workers import start_rollout_worker
from qerl_rollout.workers.placement import EnginePool
from qerl_rollout.workers.trainer import RayTrainer

LR = 1e-2
ADAM_EPS = 1e-8                  # torch.optim.AdamW's default, which Policy uses
DELTA = 1e-6                     # gradient error bound, relative to the largest entry (measured ~3e-7)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43], [300, 301]]
SAMPLING = dict(n=4, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _policy_config(model_dir) -> PolicyConfig:
    return PolicyConfig(model_path=str(model_dir), device="cpu", lora_rank=8, lora_alpha=16, lr=LR,
                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "lm_head"),
                        micro_batch_size=64)


def _batch() -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (5 + i % 3,), generator=g).tolist() for i in range(16)]
    responses = [torch.randint(3, 500, (4 + i % 5,), generator=g).tolist() for i in range(16)]
    batch = TokenBatch.from_token_lists(prompts, responses, 0)
    logp_rollout = -torch.rand(batch.response_mask.shape, generator=g) * batch.response_mask
    return batch, torch.randn(16, generator=g), logp_rollout


@pytest.fixture(scope="module")
def trainer(ray_cluster, tiny_qwen3_moe):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(pg.ready())
    grpo = GRPOConfig(group_size=4, horizon=8)
    from qerl_rollout.rl.aqn import AQNConfig
    from qerl_rollout.rl.mismatch import MismatchConfig

    t = RayTrainer.start([Slot(0, 1, 0), Slot(1, 1, 0)], pg, _policy_config(tiny_qwen3_moe), grpo,
                         MismatchConfig(), AQNConfig(), 10)
    yield t
    t.close()
    remove_placement_group(pg)


def test_two_ranks_take_the_single_process_step(trainer, tiny_qwen3_moe):
    from qerl_rollout.rl.mismatch import MismatchConfig

    batch, advantages, logp_rollout = _batch()
    single = Policy(_policy_config(tiny_qwen3_moe), GRPOConfig(group_size=4, horizon=8), MismatchConfig())
    m1 = single.backward(batch, advantages, logp_rollout)
    grads = {n: p.grad.clone() for n, p in single.model.named_parameters() if p.requires_grad}
    m1.update(single.optimizer_step())
    m2 = trainer.train_step(batch, advantages, logp_rollout)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    assert m2["response_tokens"] == m1["response_tokens"]
    assert m2["mismatch_kl_k3"] == pytest.approx(m1["mismatch_kl_k3"], rel=1e-4)
    w1, w2 = single.lora_tensors(), trainer.state_dict()["lora"]
    assert w1.keys() == w2.keys()
    compared = nonzero = 0
    for name, g in grads.items():
        # AdamW's first step is -lr * g / (|g| + eps): its change for a gradient error d is at
        # most lr * eps * d / (|g| - d)^2, with d <= DELTA * max|g|; below 2d a sign may flip.
        d = DELTA * g.abs().max()
        clear = g.abs() > 2 * d
        bound = LR * ADAM_EPS * d / (g.abs() - d).clamp(min=1e-30) ** 2 + 1e-7
        excess = ((w1[name] - w2[name]).abs() - bound)[clear]
        assert excess.numel() == 0 or excess.max() <= 0, name
        compared, nonzero = compared + int(clear.sum()), nonzero + int((g != 0).sum())
    assert compared > 0.99 * nonzero   # lora_A's gradients are exactly 0 at step 1 (B starts at 0)


def test_the_step_moved_the_weights(trainer):
    """Guards the comparison above: the 2-rank step changed lora_B (it starts at zero)."""
    lora = trainer.state_dict()["lora"]
    moved = [n for n, t in lora.items() if "lora_B" in n and t.abs().max() > 0]
    assert len(moved) == sum("lora_B" in n for n in lora)


def _pool(model_dir, n: int) -> EnginePool:
    workers = [start_rollout_worker(model_dir, QuantConfig("fp8_block"), num_cpus=0.5, seed=0,
                                    max_model_len=128) for _ in range(n)]
    return EnginePool(workers, [f"engine {i}" for i in range(n)])


def test_two_engines_sample_what_one_engine_samples_after_a_sharded_push(trainer, tiny_qwen3_moe):
    one, two = _pool(tiny_qwen3_moe, 1), _pool(tiny_qwen3_moe, 2)
    try:
        trainer.connect("one", one.workers, "fp8_block", 1 << 20)
        trainer.connect("two", two.workers, "fp8_block", 1 << 20)
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
