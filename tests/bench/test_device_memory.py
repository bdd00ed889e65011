"""The device check's memory part (`bench device_memory`) on CPU: its logic, not its figures.

`--cpu-smoke` runs the same steps over gloo on a 2-layer model: the checkpoint save writes
the rank's torch.distributed.checkpoint files, the load restores every zeroed trainable value
and AdamW moment bit for bit, and so does the offload round trip. The device figures (peak memory
above resident, the allocator cache on the host) exist only on CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qerl_rollout.bench.device_memory import failed

REPO = Path(__file__).resolve().parents[2]


def test_device_memory_smoke_runs_every_part(tmp_path):
    out = tmp_path / "device_memory.json"
    run = subprocess.run([sys.executable, "-m", "qerl_rollout.bench", "device_memory", "--cpu-smoke",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert parts["save"]["files"] == [".metadata", "__0_0.distcp"]
    assert parts["load"]["values_equal"] is True and parts["offload"]["values_equal"] is True
    assert not failed(result)
    assert failed({**result, "parts": {**parts, "load": {"error": "OutOfMemoryError: ..."}}})
    assert failed({**result, "parts": {**parts, "load": {"values_equal": False}}})
    assert "values equal after the round trip: True" in run.stdout
    assert "values equal after the load: True" in run.stdout


def test_the_device_check_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "device_check.sh")], check=False).returncode == 0
