"""The report's routing heatmaps read what the run wrote (`qerl_rollout.report`)."""

from __future__ import annotations

import json

from qerl_rollout.report import EXPERTS_FILE, _expert_counts, _flip_rates, _over_mean, write_report

NAMES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_expert_counts_sum_the_steps_and_a_resumed_step_replaces_the_killed_one(tmp_path):
    lines = [{"step": 1, "names": NAMES, "trainer": [[1, 2], [3, 4]], "rollout": None},
             {"step": 2, "names": NAMES, "trainer": [[9, 9], [9, 9]], "rollout": [[1, 1], [0, 2]]},
             {"step": 2, "names": NAMES, "trainer": [[5, 6], [7, 8]], "rollout": [[2, 0], [1, 1]]}]   # resumed
    (tmp_path / EXPERTS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    counts = _expert_counts(tmp_path)
    assert counts == {"names": NAMES, "trainer": [[6, 8], [10, 12]], "rollout": [[2, 0], [1, 1]]}
    assert _over_mean(counts["trainer"]) == [[6 / 7, 8 / 7], [10 / 11, 12 / 11]]
    assert _expert_counts(tmp_path / "none") == {"names": None, "trainer": None, "rollout": None}


def test_flip_rates_per_layer_and_step():
    rows = [{"step": 1}, {"step": 2, "router/flip_rate/layer1": 0.5, "router/flip_rate/layer0": 0.25},
            {"step": 3}, {"step": 4, "router/flip_rate/layer0": 0.0, "router/flip_rate/layer1": 1.0}]
    assert _flip_rates(rows) == ([[0.25, 0.0], [0.5, 1.0]], ["layer0", "layer1"], [2, 4])
    assert _flip_rates([{"step": 1}]) == (None, [], [])


def test_a_report_with_and_without_routing(tmp_path):
    rows = [{"step": s, "reward/mean": 0.5, "router/flip_rate/layer0": 0.1} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_report(tmp_path).read_bytes()[:4] == b"\x89PNG"                 # no experts.jsonl
    (tmp_path / EXPERTS_FILE).write_text(json.dumps({"step": 1, "names": NAMES[:1], "trainer": [[1, 3]],
                                                     "rollout": [[2, 2]]}) + "\n")
    assert write_report(tmp_path).read_bytes()[:4] == b"\x89PNG"
