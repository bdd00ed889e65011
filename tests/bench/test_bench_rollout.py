"""`python -m qerl_rollout.bench rollout` on the tiny model: it runs, pairs rounds and writes JSON.

Timings are not asserted (a shared machine makes them noise). What is a property of the code:
int8 runs in the mode `auto` picks on this CPU (kernel where it has INT8 kernels: AMX, or
AVX-512 with zentorch; emulate elsewhere), every round has a rate per engine, the speedup is the median of
the per-round ratios, and the quantization cost is measured on the quantized samples (a small,
non-negative k3 KL: ~4e-4 for int8 on this model, see tests/rollout/test_baseline.py).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from qerl_rollout.rollout.platform import kernel_paths


def test_rollout_bench_on_the_tiny_model(tmp_path, tiny_qwen3_moe):
    out = tmp_path / "rollout.json"
    run = subprocess.run([sys.executable, "-m", "qerl_rollout.bench", "rollout", "--model",
                          str(tiny_qwen3_moe), "--prompts", "2", "--n", "2", "--max-tokens", "4",
                          "--repeats", "2", "--kv-cache-gib", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "speedup vs bf16" in run.stdout
    data = json.loads(out.read_text())
    assert data["modes"] == {"bf16": "emulate", "int8": kernel_paths()["int8"]}
    rows = {r["scheme"]: r for r in data["rows"]}
    assert len(rows["bf16"]["tokens_per_s"]) == len(rows["int8"]["tokens_per_s"]) == 2
    ratios = [a / b for a, b in zip(rows["int8"]["tokens_per_s"], rows["bf16"]["tokens_per_s"])]
    assert rows["int8"]["speedup_vs_bf16"] == statistics.median(ratios)
    assert rows["bf16"]["speedup_vs_bf16"] == 1.0 and rows["bf16"]["cost"] is None
    cost = rows["int8"]["cost"]
    assert 0 <= cost["kl_k3"] < 1e-2 and 0 < cost["logp_gap_mean"] <= cost["logp_gap_max"]
