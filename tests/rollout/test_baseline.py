"""BF16Baseline on real engines: it measures the speedup and the KL against the same policy.

The quantized engine serves INT8 (through vLLM's kernels where this CPU has them, emulated
elsewhere); the baseline serves BF16. After a push
of a policy far from the checkpoint (LoRA B ~ N(0, 0.2) on attention and experts), a measuring
baseline is pushed the same policy, so the KL it reports is only quantization's: measured
~5e-4 (k3) on the 0.43B model and below 1e-2 here. A baseline that is never pushed compares the
policy with the old checkpoint instead (measured first, on the same BF16 engine before its
push); the check that its KL is far larger (> 0.05) shows the metric can fail.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from qerl_rollout import QuantConfig, WeightSync
from qerl_rollout.placement.local import LocalRollout
from qerl_rollout.rollout.baseline import BF16Baseline
from qerl_rollout.rollout.platform import kernel_paths

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_sync import lora_policy  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [300, 301, 302], [40, 41]]
SAMPLING = dict(n=4, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)


def test_baseline_measures_speedup_and_kl_of_the_same_policy(tiny_model):
    model_dir = tiny_model("qwen3_moe")
    quant = LocalRollout(model_dir, QuantConfig("int8"), max_model_len=128)
    assert quant.engine.mode == kernel_paths()["int8"]
    policy = lora_policy(model_dir)
    WeightSync(quant.receiver).push(policy)
    samples = quant.generate(PROMPTS, **SAMPLING)
    bf16 = LocalRollout(model_dir, QuantConfig("bf16"), max_model_len=128)
    baseline = BF16Baseline(bf16, push=lambda: WeightSync(bf16.receiver).push(policy))
    try:
        stale = baseline.measure(quant, PROMPTS, samples, **SAMPLING)   # measure never pushes
        assert baseline.rollout.receiver.version == 0
        baseline.push()                                          # the caller's push, then measure
        m = baseline.measure(quant, PROMPTS, samples, **SAMPLING)
        assert baseline.rollout.receiver.version == 1
        assert m["rollout/speedup_vs_bf16"] > 0 and m["rollout/bf16_tokens_per_s"] > 0
        print({k: round(v, 5) for k, v in m.items()})
        assert 0 <= m["quant/kl_vs_bf16"] < 1e-2 and math.isfinite(m["quant/kl_k1_vs_bf16"])
        assert 0 < m["quant/logp_gap_mean"] <= m["quant/logp_gap_max"]
        assert m["baseline/seconds"] > 0
        assert stale["quant/kl_vs_bf16"] > 0.05 > 5 * m["quant/kl_vs_bf16"]
        # At another temperature the KL is not defined against `score`: only the speedup.
        warm = baseline.measure(quant, PROMPTS, samples, **{**SAMPLING, "temperature": 0.7})
        assert "quant/kl_vs_bf16" not in warm and warm["rollout/speedup_vs_bf16"] > 0
    finally:
        baseline.close()
        quant.close()


def test_baseline_must_serve_bf16(tiny_model):
    class Fake:
        receiver = type("R", (), {"scheme": "int8"})()

    with pytest.raises(ValueError, match="must serve bf16"):
        BF16Baseline(Fake(), push=lambda: None)
