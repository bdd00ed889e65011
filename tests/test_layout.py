"""Placements are checked against the model and the cluster before anything starts.

The shipped GPU configs are validated against the published shapes of their models (typed in
below from the models' config.json) on an 8-GPU node; the TP rules are checked against a
hand-derived table for Qwen3-30B-A3B (32 heads, 4 KV heads, 768-wide experts).
"""

from __future__ import annotations

import pytest

from qerl_rollout.config import load_config
from qerl_rollout.layout import LayoutError, check_model, plan_layout

QWEN3_30B_A3B = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_hidden_layers=48, vocab_size=151936)
QWEN3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, num_hidden_layers=36, vocab_size=151936)
NODE_8_GPUS = {"CPU": 128.0, "GPU": 8.0, "max_gpus_per_node": 8.0}
GPU_CONFIGS = {"grpo_qwen3_30b": QWEN3_30B_A3B, "grpo_qwen3_30b_nvfp4": QWEN3_30B_A3B,
               "grpo_qwen3_8b": QWEN3_8B}


def _cfg(name: str, *overrides: str):
    return load_config([f"config={name}", "model.path=/m", "task.path=/d.jsonl", *overrides])


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_shipped_gpu_configs_fill_one_8_gpu_node(name):
    cfg = _cfg(name)
    layout = plan_layout(cfg, GPU_CONFIGS[name], NODE_8_GPUS, with_baseline=False)
    assert layout.use_gpus and layout.needs("GPU") == 8
    assert len(layout.trainers) == cfg.trainer.num_workers and len(layout.engines) == cfg.rollout.num_engines
    with pytest.raises(LayoutError, match="needs 8 GPUs; the Ray cluster has 7"):
        plan_layout(cfg, GPU_CONFIGS[name], {**NODE_8_GPUS, "GPU": 7.0}, with_baseline=False)


def test_split_bundles_and_colocated_pairs():
    split = plan_layout(_cfg("grpo_qwen3_30b"), QWEN3_30B_A3B, NODE_8_GPUS, with_baseline=False)
    assert [b["GPU"] for b in split.bundles] == [1] * 8
    assert {s.bundle for s in split.trainers}.isdisjoint({s.bundle for s in split.engines})
    tp2 = plan_layout(_cfg("grpo_qwen3_30b", "rollout.num_engines=2", "rollout.tensor_parallel_size=2"),
                      QWEN3_30B_A3B, NODE_8_GPUS, with_baseline=False)
    assert [b["GPU"] for b in tp2.bundles] == [1, 1, 1, 1, 2, 2]
    colocated = plan_layout(_cfg("grpo_qwen3_8b"), QWEN3_8B, NODE_8_GPUS, with_baseline=False)
    assert [(t.bundle, e.bundle) for t, e in zip(colocated.trainers, colocated.engines)] == [(i, i) for i in range(8)]
    assert all(s.num_gpus == 0.5 for s in colocated.trainers + colocated.engines)
    with pytest.raises(LayoutError, match="trainer.num_workers == rollout.num_engines"):
        plan_layout(_cfg("grpo_qwen3_8b", "rollout.num_engines=4"), QWEN3_8B, NODE_8_GPUS, False)


# TP sizes 1..8 that Qwen3-30B-A3B allows: heads 32 % tp, kv 4 vs tp, and per scheme the
# shard widths 4096/tp, 6144/tp, 768/tp in 128- (fp8_block) or 16-wide (nvfp4) units.
ALLOWED_TP = {"fp8_block": [1, 2], "nvfp4": [1, 2, 4, 8], "fp8_channel": [1, 2, 4, 8], "bf16": [1, 2, 4, 8]}


@pytest.mark.parametrize("scheme", sorted(ALLOWED_TP))
def test_tensor_parallel_sizes_of_qwen3_30b(scheme):
    allowed = []
    for tp in range(1, 9):
        try:
            check_model(QWEN3_30B_A3B, tp, scheme, trainer_ranks=4)
            allowed.append(tp)
        except LayoutError as e:
            assert "\n" not in str(e) and f"tensor_parallel_size={tp}" in str(e)
    assert allowed == ALLOWED_TP[scheme]


def test_a_trainer_rank_without_experts_is_refused():
    tiny = dict(QWEN3_30B_A3B, num_experts=8)
    check_model(tiny, 1, "fp8_block", trainer_ranks=4)        # 2 experts per rank
    with pytest.raises(LayoutError, match="leaves a rank without any of the 8 experts"):
        check_model(tiny, 1, "fp8_block", trainer_ranks=5)    # ceil(8/5) = 2: rank 4 gets none


def test_cpu_layouts_count_cpus_and_the_baseline():
    cfg = load_config(["config=grpo_tiny_cpu", "placement.mode=split", "trainer.num_workers=2",
                       "rollout.num_engines=2", "run.router_stats_every=0"])
    layout = plan_layout(cfg, QWEN3_8B, {"CPU": 8.0}, with_baseline=True)
    assert not layout.use_gpus and layout.needs("CPU") == 5 and layout.baseline.bundle == 4
    with pytest.raises(LayoutError, match="needs 5 CPUs; the Ray cluster has 4"):
        plan_layout(cfg, QWEN3_8B, {"CPU": 4.0}, with_baseline=True)


def test_placement_errors_in_the_config_itself():
    with pytest.raises(ValueError, match="placement.mode=split"):
        load_config(["config=grpo_tiny_cpu", "placement.mode=ray"])
    with pytest.raises(ValueError, match="placement.mode=local runs one trainer"):
        load_config(["config=grpo_tiny_cpu", "trainer.num_workers=2"])
    with pytest.raises(ValueError, match="without prompts"):
        load_config(["config=grpo_tiny_cpu", "placement.mode=split", "run.router_stats_every=0",
                     "rollout.num_engines=9"])
