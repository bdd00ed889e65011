"""Smoke test of the sync benchmark: `--quick` on the tiny model writes a complete JSON.

Timings are not checked (they depend on the machine); the bytes are: a bf16 push sends
exactly the BF16 bytes, an FP8 push sends fewer, and an attention-only delta push sends a
strict subset of a full push.
"""

from __future__ import annotations

import json


def test_quick_run_writes_rows_for_each_scheme(tmp_path, capsys):
    from qerl_rollout.bench import sync  # vLLM is part of the setup: an import error fails

    out = tmp_path / "sync.json"
    argv = ["--quick", "--full-repeats", "1", "--delta-repeats", "1", "--out", str(out), "--models-dir", str(tmp_path)]
    assert sync.main(argv) == 0

    result = json.loads(out.read_text())
    rows = {r["scheme"]: r for r in result["rows"]}
    assert set(rows) == set(sync.QUICK_SCHEMES)
    assert rows["bf16"]["wire_ratio"] == 1.0
    assert rows["fp8_block"]["wire_ratio"] < 1.0
    for r in rows.values():
        assert r["model"] == "tiny" and r["restart_s"] > 0
        assert r["full"]["full"] and not r["delta"]["full"]
        assert 0 < r["delta"]["bytes_sent"] < r["full"]["bytes_sent"]
        assert set(r["pass"]) == {"wire", "delta", "restart"}
    assert "restart s" in capsys.readouterr().out


def test_dispatcher_knows_sync():
    from qerl_rollout.bench.__main__ import BENCHMARKS

    assert BENCHMARKS["sync"] == "qerl_rollout.bench.sync"
