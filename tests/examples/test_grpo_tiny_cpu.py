"""The learning test: `python -m qerl_rollout.train` itself, the default config, raises the reward.

The margin was measured with the default config as it is (fp8_block, LoRA r16 on attention +
lm_head, lr 1e-2 on a cosine schedule over the run's 40 steps, 8 prompts x group 8, 8 tokens)
on the shared 2-core CPU machine (Intel Xeon with AMX): seed 0 went from 0.35 (mean of the
first 5 steps) to 1.00 (last 5), reaching 1.0 at step 20; with 25 steps (a faster-decaying
LR) seeds 0-3 ended at 0.75-1.00 from 0.35-0.37. A rise > 0.3 and a final mean > 0.8 leave
room, while a loop that does not learn fails both: without LoRA on lm_head the reward stayed
at 0.30-0.45 (examples/README.md). The same run with rollout routing replay (R3) must learn
as well (measured: 0.48 -> 1.00 on the Intel machine). That R3 narrows the rollout/trainer gap
is checked on one set of samples (tests/rollout/test_routes.py): across two runs it need not
show, as each policy goes its own way. The example script, which runs the same loop through
`train.run`, gets a short run of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny_cpu.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The default run, and the same with rollout routing replay: run dir per replay mode."""
    out = {}
    for replay in ("none", "r3"):
        root = tmp_path_factory.mktemp(f"learn-{replay}")
        run = subprocess.run([sys.executable, "-m", "qerl_rollout.train", f"run.output_dir={root}",
                              "tracking.run_name=r", "tracking.wandb_mode=disabled",
                              f"rollout.routing_replay={replay}"],
                             capture_output=True, text=True, timeout=900, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        out[replay] = root / "r"
    return out


@pytest.mark.parametrize("replay", ["none", "r3"])
def test_the_train_command_learns(runs, replay):
    summary = json.loads((runs[replay] / "summary.json").read_text())
    print(summary)
    assert summary["steps"] == 40
    assert summary["eval/reward"] > 0.8     # the held-out prompts, which training never saw
    assert summary["reward_last5"] - summary["reward_first5"] > 0.3, summary
    assert summary["reward_last5"] > 0.8, summary
    assert Path(summary["report"]).is_file()


def test_the_example_runs_the_same_loop(tmp_path):
    out = tmp_path / "curve.json"
    run = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "3", "--out", str(out),
                          "rollout.prompts_per_step=2"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["step"] for r in data["curve"]] == [1, 2, 3]
    assert [r["rollout/version"] for r in data["curve"]] == [0, 1, 2]
