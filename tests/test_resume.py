"""Checkpoint and resume: a run killed with SIGKILL continues where its last checkpoint left off.

The killed run is a real subprocess of `python -m qerl_rollout.train`, killed as soon as its
first checkpoint is complete (so somewhere in steps 3-4, possibly while writing the next one).
Rerun with `run.resume=true`, it must finish with every step logged exactly once, and its
metrics for the steps after the checkpoint must equal those of an uninterrupted run with the
same seed. They are compared exactly: the trainer, optimizer, sampler and RNG states are
restored bit for bit, the engine is pushed the restored weights (equal to a fresh load, so
equal to the uninterrupted engine's after its delta pushes), and sampling is seeded per step.
What legitimately differs is only what measures the machine or the push itself (times, bytes:
the first push after a resume is a full one), which the comparison leaves out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qerl_rollout import checkpoint, train
from qerl_rollout.tracking import read_metrics

# Rollout routing replay on: the resumed run's engine routes (and the trainer replays) as the
# uninterrupted one's does.
ARGS = ["run.steps=6", "run.save_every=2", "rollout.prompts_per_step=4", "rollout.routing_replay=r3",
        "tracking.wandb_mode=offline"]
COMPARED = ("reward/mean", "reward/std", "loss/policy", "train/grad_norm", "rollout_corr/k3_kl",
            "rollout/response_len", "rollout/version", "sync/version", "experts/trainer/load_cv",
            "experts/trainer/max_over_mean", "experts/trainer/dead", "experts/rollout/load_cv",
            "router/topk_agreement", "router/flip_rate")


def _kill_after_first_checkpoint(out, name, args=ARGS) -> int:
    cmd = [sys.executable, "-m", "qerl_rollout.train", f"run.output_dir={out}",
           f"tracking.run_name={name}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt_dir = out / name / "checkpoints"
    deadline = time.monotonic() + 300
    while not (ckpt_dir / "step-000002").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(read_metrics(out / name))


def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, capsys):
    assert train.main([f"run.output_dir={tmp_path}", "tracking.run_name=full", *ARGS]) == 0
    full = read_metrics(tmp_path / "full")
    logged_when_killed = _kill_after_first_checkpoint(tmp_path, "killed")
    assert 2 <= logged_when_killed < 6

    resume = [f"run.output_dir={tmp_path}", "tracking.run_name=killed", "run.resume=true", *ARGS]
    refused = train.main([*resume, "rollout.scheme=nvfp4"])
    assert refused == 2 and "cannot resume: rollout.scheme differs" in capsys.readouterr().err
    # The schedule and the placement too, refused before any engine or actor starts.
    assert train.main([*resume, "run.steps=9"]) == 2
    assert "cannot resume: run.steps differs from the checkpointed run (6 there, 9 now)" in capsys.readouterr().err
    assert train.main([*resume, "placement.mode=split"]) == 2
    assert "cannot resume: placement.mode differs" in capsys.readouterr().err
    assert train.main([*resume, "rollout.quant_overrides.experts=nvfp4"]) == 2
    assert ("cannot resume: rollout.quant_overrides differs from the checkpointed run ({} there, "
            "{'experts': 'nvfp4'} now)") in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()
    assert train.main(resume) == 0
    err = capsys.readouterr().err
    resumed_after = int(err.split("resume: continuing after step ")[1].split()[0])
    assert resumed_after in (2, 4)

    rows = read_metrics(tmp_path / "killed")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]          # no gap, no duplicate
    for mine, ref in zip(rows, full):
        assert {k: mine[k] for k in COMPARED} == {k: ref[k] for k in COMPARED}, mine["step"]
    assert rows[resumed_after]["sync/mb"] < rows[0]["sync/mb"]      # later pushes are deltas again
    # wandb resumed the same run id; the checkpoints kept are the newest two.
    run_ids = {p.name.rsplit("-", 1)[1] for p in (tmp_path / "killed" / "wandb").glob("offline-run-*")}
    assert len(run_ids) == 1
    kept = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["steps"] == 6


# Per-module precision too: NVFP4 experts beside the scheme's FP8 attention (`quant_overrides`).
SPLIT = ["run.steps=4", "run.save_every=2", "rollout.prompts_per_step=4", "rollout.routing_replay=r3",
         "rollout.quant_overrides.experts=nvfp4", "placement.mode=split", "trainer.num_workers=2",
         "rollout.num_engines=2", "eval.every=0", "tracking.wandb_mode=disabled"]


def test_a_killed_split_run_with_two_workers_and_two_engines_resumes_exactly(tmp_path):
    """The same on Ray: 2 FSDP2 ranks that each wrote and now read their own shards of the
    trainer state, and 2 engines pushed the restored policy; SIGKILL takes the driver, and
    with it the actors (Ray ends the workers of a dead driver). The engines hold NVFP4 experts
    and FP8 attention, and the push check passes on the first push: its hash half (a sharded
    trainer holds no whole policy for the logits half's QDQ reference)."""
    assert train.main([f"run.output_dir={tmp_path}", "tracking.run_name=full", *SPLIT]) == 0
    full = read_metrics(tmp_path / "full")
    logged_when_killed = _kill_after_first_checkpoint(tmp_path, "killed", SPLIT)
    assert 2 <= logged_when_killed < 4
    assert train.main([f"run.output_dir={tmp_path}", "tracking.run_name=killed", "run.resume=true", *SPLIT]) == 0
    rows = read_metrics(tmp_path / "killed")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for mine, ref in zip(rows, full):
        assert {k: mine[k] for k in COMPARED} == {k: ref[k] for k in COMPARED}, mine["step"]
    # After the resume's full push, step 3's is the delta the uninterrupted run sent.
    assert rows[2]["sync/mb"] == full[2]["sync/mb"]
    assert rows[0]["sync/verify_hash_ok"] == 1.0 and "sync/verify_mean_dlogp" not in rows[0]


def test_a_corrupt_or_partial_checkpoint_is_skipped_for_the_previous_good_one(tmp_path, caplog):
    run_dir = tmp_path / "r"
    assert train.main([f"run.output_dir={tmp_path}", "tracking.run_name=r", "run.steps=2",
                       "run.save_every=1", "rollout.prompts_per_step=2", "run.router_stats_every=0",
                       "tracking.wandb_mode=disabled"]) == 0
    root = run_dir / "checkpoints"
    good = root / "step-000002"
    torn = root / "step-000003"                  # a newer checkpoint with a trainer shard cut short
    shutil.copytree(good, torn)
    shard = torn / "trainer" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    lost = root / "step-000004"                  # and one whose shard file never arrived
    shutil.copytree(good, lost)
    (lost / "trainer" / "__0_0.distcp").unlink()
    (root / ".step-000005.partial-x").mkdir()   # what a kill during save leaves
    with caplog.at_level(logging.WARNING, logger="qerl_rollout.checkpoint"):
        state, path = checkpoint.latest(run_dir)
    assert path == good and state.step == 2 and state.engine_version == 2
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert "step-000004" in skipped[0] and "__0_0.distcp is missing" in skipped[0]
    assert "step-000003" in skipped[1] and "cut short (100 of" in skipped[1]
    # A checkpoint of the older single-file format is refused in one line, not skipped.
    old = root / "step-000006"
    old.mkdir()
    (old / "trainer.pt").write_bytes(b"x")
    with pytest.raises(checkpoint.OldFormatError, match="cannot resume: .*step-000006 was written by an older"):
        checkpoint.latest(run_dir)


def test_report_cli(tmp_path, capsys):
    from qerl_rollout.report import main as report_main

    assert report_main([str(tmp_path / "missing")]) == 2
    assert "No such file" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(
        '{"step": 1, "reward/mean": 0.5, "rollout/seconds": 1.0}\n'
        '{"step": 2, "reward/mean": 0.7, "rollout/seconds": 1.5, "rollout/speedup_vs_bf16": 1.2}\n')
    assert report_main([str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_checkpoints_the_last_completed_step(tmp_path):
    cmd = [sys.executable, "-m", "qerl_rollout.train", f"run.output_dir={tmp_path}",
           "tracking.run_name=r", "run.steps=200", "run.save_every=0", "eval.every=0",
           "rollout.prompts_per_step=2", "run.router_stats_every=0", "tracking.wandb_mode=disabled"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "r" / "metrics.jsonl").exists() or len(read_metrics(tmp_path / "r")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    logged = read_metrics(tmp_path / "r")[-1]["step"]
    state, path = checkpoint.latest(tmp_path / "r")
    # the interrupt may land between logging a step and counting it done: then the one before
    assert state.step in (logged - 1, logged) and f"step {state.step} is checkpointed" in err


def test_a_save_whose_trainer_shard_did_not_arrive_leaves_no_checkpoint(tmp_path):
    """A rank that wrote its shard where the driver cannot see it (another node, another
    filesystem) is caught before the rename: no step directory, no partial one left behind."""
    import torch
    import torch.distributed.checkpoint as dcp

    def write_trainer(path):
        dcp.save({"lora": torch.ones(4)}, checkpoint_id=str(path), no_dist=True)
        (path / "__0_0.distcp").unlink()       # as if rank 0's file went to its own disk

    state = checkpoint.RunState(step=3, engine_version=3, sampler={}, rng=checkpoint.rng_state(), identity={})
    with pytest.raises(FileNotFoundError, match="__0_0.distcp is missing: a trainer rank's shard did not arrive"):
        checkpoint.save(tmp_path, state, write_trainer, lambda path: path.mkdir())
    assert list((tmp_path / "checkpoints").iterdir()) == []
