"""`bench e2e`: two real runs of the train command (tiny model), their table, JSON and plot, and
the summary arithmetic checked by hand."""

from __future__ import annotations

import json

import pytest

from qerl_rollout.bench.e2e import main, ratios, summarize, time_to_reward


def _rows(seconds, rewards):
    return [{"step": i + 1, "step/seconds": s, "rollout/seconds": s / 2, "train/seconds": s / 4,
             "sync/seconds": s / 8, "rollout/tokens_per_s": 100 / s, "reward/mean": r}
            for i, (s, r) in enumerate(zip(seconds, rewards))]


def test_the_summary_leaves_step_one_out_and_sums_time_to_reward():
    rows = _rows([30.0, 4.0, 6.0, 5.0], [0.1, 0.4, 0.6, 0.9])
    s = summarize("int8", rows, reward_level=0.5)
    assert s["step/seconds"] == 5.0 and s["first_step_s"] == 30.0     # median of 4, 6, 5
    assert s["rollout/tokens_per_s"] == 20.0
    assert (s["reward_first"], s["reward_last"]) == (0.1, 0.9)
    assert s["time_to_reward_s"] == 40.0 == time_to_reward(rows, 0.5)  # 30 + 4 + 6, at step 3
    assert time_to_reward(rows, 0.95) is None
    base = summarize("bf16", _rows([30.0, 8.0, 12.0, 10.0], [0.1] * 4), 0.5)
    r = ratios([base, s])["int8"]
    assert r["step/seconds"] == 0.5 and r["rollout/tokens_per_s"] == 2.0
    assert ratios([s]) == {}


def test_the_command_runs_each_scheme_and_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert main(["--config", "grpo_moe_cpu_int8", "--schemes", "int8", "bf16", "--steps", "2", "--out", str(out),
                 "--runs-dir", str(tmp_path / "runs"), "model.tiny_size=tiny", "rollout.prompts_per_step=4",
                 "rollout.max_tokens=8", "policy.micro_batch_size=64"]) == 0
    printed = capsys.readouterr().out
    assert "int8 / bf16: step" in printed
    result = json.loads(out.read_text())
    assert [s["scheme"] for s in result["summaries"]] == ["int8", "bf16"]
    for s in result["summaries"]:
        rows = result["runs"][s["scheme"]]
        assert [r["step"] for r in rows] == [1, 2]
        assert "rollout/speedup_vs_bf16" not in rows[1] and "eval/reward" not in rows[1]   # baseline, eval off
        # a step's wall time holds its phases
        assert rows[1]["step/seconds"] >= rows[1]["rollout/seconds"] + rows[1]["train/seconds"] + rows[1]["sync/seconds"]
        assert s["step/seconds"] == rows[1]["step/seconds"] and s["first_step_s"] == rows[0]["step/seconds"]
    assert set(result["ratios_to_bf16"]) == {"int8"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--steps", "1"])
    assert "--steps must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--frobnicate"])
    assert "config overrides are key=value" in capsys.readouterr().err
