"""`cached_export`: one export per checkpoint, scheme, format and plan, safe under concurrent starts.

Before the lock, N engines starting together on a cold cache each saw no export, each wrote
one, and every one after the first died at the final rename (`_commit`: the directory now
existed; measured with that logic: 2 of 3 processes died with an AssertionError there). Here 3 processes released at one barrier ask for the same export: all must return
the same directory, holding exactly what a direct `export_checkpoint` writes, with no temporary
directory left behind. The key must change with what changes the bytes (the source files, the
scheme, EXPORT_FORMAT) and only with that.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from test_export import _read_all

from qerl_rollout.quant import export
from qerl_rollout.quant.export import cached_export, export_checkpoint, export_key


def _ask(barrier, model_dir, root, results):
    barrier.wait()
    results.put(str(cached_export(model_dir, "fp8_block", root, progress=False)))


def test_three_processes_on_a_cold_cache_share_one_export(tiny_qwen3_moe, tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_ask, args=(barrier, str(tiny_qwen3_moe), str(tmp_path / "cache"), results))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    dirs = {results.get(timeout=5) for _ in range(3)}
    assert len(dirs) == 1, dirs
    out = Path(dirs.pop())
    export_checkpoint(tiny_qwen3_moe, tmp_path / "direct", "fp8_block", progress=False)
    got, want = _read_all(out), _read_all(tmp_path / "direct")
    assert got.keys() == want.keys()
    for k in want:   # bytes, not values: fp8 has no torch.equal
        assert got[k].dtype == want[k].dtype and got[k].view(-1).view(torch.uint8).equal(want[k].view(-1).view(torch.uint8)), k
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert entries == sorted([out.name, f".{out.name}.lock"])   # no partial directory left


def test_a_second_call_reuses_the_export(tiny_qwen3_moe, tmp_path, monkeypatch):
    first = cached_export(tiny_qwen3_moe, "int8", tmp_path, progress=False)
    monkeypatch.setattr(export, "export_checkpoint", lambda *a, **k: pytest.fail("exported twice"))
    assert cached_export(tiny_qwen3_moe, "int8", tmp_path, progress=False) == first


def test_the_key_follows_the_files_the_scheme_and_the_format(tiny_qwen3_moe, tmp_path, monkeypatch):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen3_moe, model)
    key = export_key(model, "fp8_block")
    assert export_key(model, "fp8_block") == key                 # deterministic
    assert export_key(model, "nvfp4") != key
    monkeypatch.setattr(export, "EXPORT_FORMAT", export.EXPORT_FORMAT + 1)
    assert export_key(model, "fp8_block") != key
    monkeypatch.undo()
    weights = next(model.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a rewritten checkpoint
    assert export_key(model, "fp8_block") != key
