"""`bench checkpoint_memory` on the tiny model: its logic (2 gloo ranks load, step, save and
load; one row per rank with every phase's figure), not its figures, which are measured on the
430M model (README)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_checkpoint_memory_reports_every_rank_and_phase(tmp_path):
    out = tmp_path / "checkpoint_memory.json"
    run = subprocess.run([sys.executable, "-m", "qerl_rollout.bench", "checkpoint_memory", "--model", "tiny",
                          "--models-dir", str(tmp_path / "models"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["ranks"]
    assert [r["rank"] for r in rows] == [0, 1]
    for row in rows:
        for key in ("build_peak_above_mib", "save_peak_above_mib", "load_peak_above_mib"):
            assert row[key] >= 0, key
        assert row["model_mib"] > row["state_shard_mib"] > 0
    assert "rank   model load      save      load" in run.stdout
    assert "_get_pg_default_device" not in run.stderr     # the load's torch warnings are filtered
