"""A trainer worker that dies mid-run ends the run with an error naming it; nothing is lost.

A real `python -m qerl_rollout.train` runs the tiny config with 2 FSDP2 trainer workers and
an engine in Ray actors (placement split). As soon as its first checkpoint is complete, the
process of trainer worker 1 (pid from run_dir/workers.json) is SIGKILLed. The run must exit
with status 1 within a minute and one line naming that worker and its pid, its checkpoint must
still load, and `run.resume=true` with the same schedule (`checkpoint.identity`) but one
trainer worker where there were two (the node lost a GPU) must continue from it to the end
(the 2-rank checkpoint reshards into one) and log every step once. The run has 6 steps: the kill comes within
a poll (0.2 s) of the step-2 checkpoint, steps take seconds each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from qerl_rollout import checkpoint
from qerl_rollout.tracking import read_metrics

LAYOUT = ["placement.mode=split", "trainer.num_workers=2", "rollout.num_engines=1",
          "run.router_stats_every=0", "eval.every=0", "rollout.prompts_per_step=4",
          "tracking.wandb_mode=disabled", "run.save_every=2"]
STEPS = 6


def _train(out, *args) -> list[str]:
    return [sys.executable, "-m", "qerl_rollout.train", f"run.output_dir={out}", "tracking.run_name=r",
            *LAYOUT, *args]


def test_killed_trainer_worker_is_named_and_the_run_resumes(tmp_path):
    proc = subprocess.Popen(_train(tmp_path, f"run.steps={STEPS}"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "r"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step-000002").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    victim = json.loads((run_dir / "workers.json").read_text())["trainer"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert last and f"trainer worker 1 (pid {victim['pid']} on {victim['node']}) died" in last[-1], stderr[-3000:]
    state, path = checkpoint.latest(run_dir)
    assert state.step >= 2 and sorted(p.name for p in (path / "trainer").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]

    assert state.step < STEPS   # killed before the end
    resumed = subprocess.run(_train(tmp_path, f"run.steps={STEPS}", "run.resume=true", "trainer.num_workers=1"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing after step {state.step}" in resumed.stderr
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[state.step]["rollout/version"] == state.engine_version
