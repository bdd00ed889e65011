"""`bench code_delta` on a tiny model: its rows, table and JSON, and fractions and delta-push
bytes that follow lr."""

from __future__ import annotations

import json

from qerl_rollout.bench.code_delta import main


def test_the_command_writes_fractions_that_grow_with_the_learning_rate(tiny_qwen3_moe, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["--model", str(tiny_qwen3_moe), "--schemes", "int8", "nvfp4", "--lrs", "1e-9", "1e-2",
                 "--steps", "1", "--threads", "1", "--out", str(out)]) == 0
    assert "changed blocks" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["scheme"], r["lr"], r["step"]) for r in rows] == [
        (s, lr, step) for s in ("int8", "nvfp4") for lr, step in ((0.0, 0), (1e-9, 1), (1e-2, 1))]
    for r in rows:
        f = r["fractions"]
        if r["step"] == 0:
            assert f == {}                                  # a first push compares nothing
            assert r["bytes_sent"] == r["bytes_whole"]      # ... and sends every tensor whole
        elif r["lr"] == 1e-9:                               # below BF16's resolution of the weights
            assert f == {"all": 0.0, "attention": 0.0, "expert": 0.0}
            # no code moved, so no code travels: at most the scales (INT8: 4 bytes per row of K
            # codes; NVFP4: 1 per 8 bytes of codes, all moving with the global scale) and the
            # empty patches, under 1/8 of the bytes
            assert r["bytes_sent"] < r["bytes_whole"] / 8
        else:                                               # a step far above one quantization step
            assert f["all"] > 0.9 and set(f) == {"all", "attention", "expert"}
            assert 0.9 * r["bytes_whole"] < r["bytes_sent"] <= r["bytes_whole"]   # patches only where smaller
