"""`ray job submit`, for real: a Ray head on 127.0.0.1 runs examples/submit_ray_job.sh's job.

The head is started with `ray start --head --block` (stopped by terminating that process, so no
other Ray on the machine is touched), its job server bound to 127.0.0.1, token authentication
off (RAY_AUTH_MODE=disabled on both sides: a loopback-only test cluster). The example submits
the tiny config on Ray actors (2 FSDP2 trainer workers, 2 engines); the job must end SUCCEEDED
and its run directory must be under the absolute run.output_dir given at submission. A job
with a relative run.output_dir must fail with the error that says why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="qr", dir="/tmp")   # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = _free_port(), _free_port()
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             "--num-cpus=6", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, cwd=temp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while subprocess.run([RAY, "job", "list", "--address", address], env=env,
                         capture_output=True).returncode != 0:
        assert head.poll() is None, head.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the Ray job server did not come up in 120 s"
        time.sleep(1)
    yield address, env
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    shutil.rmtree(temp, ignore_errors=True)


def _status(address: str, env: dict, output: str) -> str:
    """The job's final status from the job server (Ray's SDK; the CLI prints it as prose)."""
    job_id = re.search(r"raysubmit_\w+", output).group(0)
    query = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
             "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    done = subprocess.run([sys.executable, "-c", query, address, job_id], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_example_job_succeeds_and_writes_where_it_was_told(ray_head, tmp_path):
    address, env = ray_head
    env = {**env, "RAY_JOB_ADDRESS": address, "QERL_OUTPUT_DIR": str(tmp_path / "runs"),
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "examples" / "submit_ray_job.sh"), "tracking.run_name=job",
                           "placement.mode=split", "trainer.num_workers=2", "rollout.num_engines=2",
                           "run.router_stats_every=0", "run.steps=2", "eval.every=0",
                           "rollout.prompts_per_step=4", "tracking.wandb_mode=disabled"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert _status(address, env, done.stdout + done.stderr) == "SUCCEEDED", done.stdout[-4000:]
    run_dir = tmp_path / "runs" / "job"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert len(json.loads((run_dir / "workers.json").read_text())["trainer"]) == 2


def test_a_relative_output_dir_is_refused_in_a_job(ray_head, tmp_path):
    address, env = ray_head
    done = subprocess.run([RAY, "job", "submit", "--address", address, "--", sys.executable, "-m",
                           "qerl_rollout.train", "run.output_dir=runs", "run.steps=1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert _status(address, env, output) == "FAILED"
    assert "run.output_dir=runs is relative: in a Ray job" in output
