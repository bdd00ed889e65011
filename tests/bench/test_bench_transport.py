"""`bench sync --transport` on the tiny model: both transports carry the same pushes (the
bench itself checks every engine's digests against what was sent), and the table and JSON."""

from __future__ import annotations

import json

from qerl_rollout.bench.sync import main
from qerl_rollout.bench.transport import format_table, summarize


def test_both_transports_carry_the_same_pushes(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["--transport", "object_store", "collective", "--size", "tiny", "--scheme", "fp8_block",
                 "--rounds", "2", "--lr", "1e-2", "--bucket-mb", "1", "--models-dir", str(tmp_path / "models"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "load+commit s" in printed and "collective" in printed
    result = json.loads(out.read_text())
    rows = result["rows"]
    # Rounds alternate the order, so drift in the machine's load hits both transports alike.
    assert [(r["round"], r["transport"], r["kind"]) for r in rows] == [
        (0, "object_store", "full"), (0, "object_store", "delta"), (0, "collective", "full"), (0, "collective", "delta"),
        (1, "collective", "full"), (1, "collective", "delta"), (1, "object_store", "full"), (1, "object_store", "delta")]
    full = {r["bytes_sent"] for r in rows if r["kind"] == "full"}
    assert len(full) == 1                                   # every full push: the same bytes
    assert all(0 < r["bytes_sent"] < min(full) for r in rows if r["kind"] == "delta")
    assert [(s["transport"], s["kind"], s["pushes"]) for s in result["summary"]] == [
        ("object_store", "full", 2), ("object_store", "delta", 2), ("collective", "full", 2), ("collective", "delta", 2)]


def test_the_summary_takes_the_fastest_push_and_the_median():
    rows = [{"transport": "collective", "kind": "full", "bytes_sent": 2e9, "seconds": s, "load_s": s / 4,
             "commit_s": s / 4} for s in (4.0, 2.0, 3.0)]
    (s,) = summarize(rows)
    assert (s["best_s"], s["median_s"], s["road_s"], s["road_median_s"]) == (2.0, 3.0, 1.0, 1.5)
    assert (s["gb_per_s"], s["road_gb_per_s"], s["mb_sent"]) == (1.0, 2.0, 2000.0)
    assert format_table([s]).splitlines()[1].split() == ["collective", "full", "3", "2000.0", "2.00", "3.00",
                                                         "1.00", "1.00", "1.50", "2.00"]
