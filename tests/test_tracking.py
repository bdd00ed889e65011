"""The run's record: metrics.jsonl is exact and complete, and real offline wandb gets the same.

wandb 0.31 in offline mode writes no `files/wandb-summary.json` or `files/config.yaml`; everything
it recorded is in the run's binary `run-<id>.wandb` file (a LevelDB-style log of protobuf
`Record`s, which `wandb sync` uploads). `_wandb_records` parses that file, so these tests check
what wandb would upload, not just that a directory appeared. `run.finish()` returns before
the wandb-core process has written that file (it lags by some milliseconds; it is complete
even if our process exits at once), so the parser waits for the run's exit record.
No test reaches the network.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time

import pytest

from qerl_rollout.tracking import Tracker, TrackingConfig, read_metrics


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))


def _tracker(tmp_path, mode="offline", **kw) -> Tracker:
    cfg = TrackingConfig(wandb_mode=mode, run_name="t", **kw)
    return Tracker(cfg, tmp_path / "run", {"name": "grpo_test", "policy": {"lr": 3e-3}})


# -- reading wandb's offline file ----------------------------------------------------------

_BLOCK = 32768  # LevelDB log block; each chunk has a 7-byte header (crc32, length, type)


def _chunks(data: bytes):
    pos, partial = 7, b""  # skip wandb's 7-byte file header ":W&B" + magic + version
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            yield partial + chunk
            partial = b""
        elif kind in (2, 3):  # FIRST, MIDDLE
            partial += chunk


def _wandb_records(run_dir, timeout_s: float = 10.0) -> dict:
    """The finished offline run's records; waits for the exit record (see module docstring)."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while not (out := _parse_wandb_file(path))["exit"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return out


def _parse_wandb_file(path) -> dict:
    """{"history": [{key: value}], "summary": {key: value}, "config": {...}, "exit": [code]}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {"history": [], "summary": {}, "config": {}, "exit": []}
    for raw in _chunks(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            items = record.summary.update
            out["summary"].update({_key(i): json.loads(i.value_json) for i in items})
        elif kind in ("run", "config"):  # the config comes with the run record, updates after
            config = record.run.config if kind == "run" else record.config
            out["config"].update({_key(i): json.loads(i.value_json) for i in config.update})
        elif kind == "exit":
            out["exit"].append(record.exit.exit_code)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


# -- the local file ------------------------------------------------------------------------


def test_log_writes_one_exact_line_per_call(tmp_path):
    rows = [{"reward/mean": 0.1 + 0.2, "loss/policy": -1 / 3, "sync/mb": 12},
            {"reward/mean": 1e-300, "loss/policy": 2.5e17, "sync/mb": 0}]
    with _tracker(tmp_path, mode="disabled") as t:
        for step, row in enumerate(rows):
            t.log(step, row)
    assert read_metrics(t.run_dir) == [{"step": i, **r} for i, r in enumerate(rows)]
    assert len((t.run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_lines_are_on_disk_before_finish(tmp_path):
    t = _tracker(tmp_path, mode="disabled")
    t.log(0, {"reward/mean": 0.5})
    assert read_metrics(t.run_dir) == [{"step": 0, "reward/mean": 0.5}]  # flushed, not buffered
    t.finish()


def test_config_json_is_the_resolved_config(tmp_path):
    config = {"name": "grpo_x", "n": 1}
    t = Tracker(TrackingConfig(wandb_mode="disabled"), tmp_path / "a" / "run", config)
    t.finish()
    assert json.loads((t.run_dir / "config.json").read_text()) == {"name": "grpo_x", "n": 1}
    assert t.name.startswith("grpo_x-")


def test_disabled_mode_writes_the_local_files_and_no_wandb_run(tmp_path):
    with _tracker(tmp_path, mode="disabled") as t:
        t.log(0, {"reward/mean": 1.0})
        t.summary({"reward_last5": 1.5})
    assert read_metrics(t.run_dir) == [{"step": 0, "reward/mean": 1.0}]
    assert json.loads((t.run_dir / "summary.json").read_text()) == {"reward_last5": 1.5}
    assert not list(t.run_dir.glob("wandb/offline-run-*"))


def test_non_finite_values_are_null_in_the_file_and_skipped_for_wandb(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qerl_rollout.tracking"), _tracker(tmp_path) as t:
        t.log(0, {"loss/policy": math.nan, "reward/mean": 0.25})
        t.log(1, {"loss/policy": math.inf, "reward/mean": 0.5})
        t.summary({"mismatch/kl_k3": math.nan, "quant/scheme": "nvfp4"})
    assert read_metrics(t.run_dir) == [{"step": 0, "loss/policy": None, "reward/mean": 0.25},
                                       {"step": 1, "loss/policy": None, "reward/mean": 0.5}]
    first_line = (t.run_dir / "metrics.jsonl").read_text().splitlines()[0]
    assert "NaN" not in first_line and json.loads(first_line)["loss/policy"] is None
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and "'loss/policy'" in warnings[0]  # once per key
    history = _wandb_records(t.run_dir)["history"]
    assert [h["reward/mean"] for h in history] == [0.25, 0.5]
    assert all("loss/policy" not in h for h in history)
    summary = json.loads((t.run_dir / "summary.json").read_text())
    assert summary == {"mismatch/kl_k3": None, "quant/scheme": "nvfp4"}


# -- wandb offline -------------------------------------------------------------------------


def test_offline_wandb_run_holds_history_summary_and_config(tmp_path):
    with _tracker(tmp_path, log_every=2, tags=("cpu",)) as t:
        for step in range(5):
            t.log(step, {"rollout/tokens_per_s": 100.0 + step, "mismatch/kl_k3": step / 7})
        t.summary({"rollout/speedup_vs_bf16": 1.5})
    rec = _wandb_records(t.run_dir)
    assert [h["_step"] for h in rec["history"]] == [0, 2, 4]  # every log_every-th step
    assert [h["mismatch/kl_k3"] for h in rec["history"]] == [0 / 7, 2 / 7, 4 / 7]
    assert rec["summary"]["rollout/speedup_vs_bf16"] == 1.5
    assert rec["config"]["policy"] == {"lr": 3e-3}
    assert rec["exit"] == [0]
    assert len(read_metrics(t.run_dir)) == 5  # the local file keeps every step


def test_finish_twice_is_fine_and_log_after_finish_fails(tmp_path):
    t = _tracker(tmp_path)
    t.log(0, {"reward/mean": 1.0})
    t.finish()
    t.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        t.log(1, {"reward/mean": 1.0})
    assert _wandb_records(t.run_dir)["exit"] == [0]


def test_context_manager_finishes_on_error(tmp_path):
    with pytest.raises(KeyError), _tracker(tmp_path) as t:
        t.log(0, {"reward/mean": 1.0})
        raise KeyError("boom")
    assert len(_wandb_records(t.run_dir)["exit"]) == 1  # wandb run closed
    assert read_metrics(t.run_dir) == [{"step": 0, "reward/mean": 1.0}]
    with pytest.raises(RuntimeError):
        t.log(1, {"reward/mean": 1.0})


def test_wandb_failing_to_start_warns_once_and_keeps_the_file(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(**kw):
        raise OSError("disk full")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger="qerl_rollout.tracking"), _tracker(tmp_path) as t:
        t.log(0, {"reward/mean": 1.0})
        t.log(1, {"reward/mean": 2.0})
        t.summary({"reward/mean": 2.0})
    assert t.run is None
    messages = [r.getMessage() for r in caplog.records if "wandb did not start" in r.getMessage()]
    path = t.run_dir / "metrics.jsonl"
    assert messages == [f"wandb did not start (OSError: disk full); metrics go to {path} only"]
    assert [r["reward/mean"] for r in read_metrics(t.run_dir)] == [1.0, 2.0]


def test_online_without_a_key_never_prompts(tmp_path, monkeypatch):
    import wandb

    seen = {}
    monkeypatch.setattr(wandb, "login", lambda **kw: seen.update(kw) or False)
    monkeypatch.setattr(wandb, "init", lambda **kw: pytest.fail("init must not run without a key"))
    with _tracker(tmp_path, mode="online") as t:
        t.log(0, {"reward/mean": 1.0})
    assert seen["prompt"] is False and t.run is None
    assert read_metrics(t.run_dir) == [{"step": 0, "reward/mean": 1.0}]


# -- reading back, helpers, config ---------------------------------------------------------


def test_read_metrics_names_the_corrupt_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"step": 1, "a": \n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not valid JSON"):
        read_metrics(tmp_path)


def test_non_numeric_metric_is_an_error_naming_the_key(tmp_path):
    with _tracker(tmp_path, mode="disabled") as t, pytest.raises(TypeError, match="'reward/mean'"):
        t.log(0, {"reward/mean": "high"})


def test_tracking_config_rejects_bad_values():
    with pytest.raises(ValueError, match="wandb_mode"):
        TrackingConfig(wandb_mode="dryrun")
    with pytest.raises(ValueError, match="log_every"):
        TrackingConfig(log_every=0)
