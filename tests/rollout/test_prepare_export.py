"""`prepare_export`: the driver exports exactly when an engine will load an export.

bf16 and emulate engines load the BF16 checkpoint (no export); engines on GPUs get one for
`mode=auto` (the driver cannot see their kernels); engines on this machine follow
`resolve_mode` here. A kernel-mode engine never exports itself: without `export_dir` it
refuses in one line (its load-dir decision is checked on every CPU, no engine started).
"""

from __future__ import annotations

import pytest

from qerl_rollout.config import QuantConfig
from qerl_rollout.rollout.engine import RolloutEngine, prepare_export, resolve_mode


def test_no_export_for_engines_that_load_the_bf16_checkpoint(tiny_qwen3_moe, tmp_path):
    assert prepare_export(tiny_qwen3_moe, QuantConfig("bf16"), engines_on_gpu=True, cache_root=tmp_path) is None
    assert prepare_export(tiny_qwen3_moe, QuantConfig("nvfp4", "emulate"), engines_on_gpu=True,
                          cache_root=tmp_path) is None
    assert not any(tmp_path.iterdir())


def test_engines_on_gpus_get_an_export_for_auto(tiny_qwen3_moe, tmp_path):
    out = prepare_export(tiny_qwen3_moe, QuantConfig("fp8_block"), engines_on_gpu=True, cache_root=tmp_path)
    assert out.parent == tmp_path and (out / "config.json").is_file()


@pytest.mark.parametrize("scheme", ["int8", "fp8_block"])
def test_engines_here_follow_resolve_mode(tiny_qwen3_moe, tmp_path, scheme):
    out = prepare_export(tiny_qwen3_moe, QuantConfig(scheme), cache_root=tmp_path)
    assert (out is not None) == (resolve_mode(QuantConfig(scheme)) == "kernel")


def test_a_kernel_engine_without_an_export_refuses(tiny_qwen3_moe, tmp_path):
    """The load-dir decision of a kernel-mode int8 engine, on every CPU: this one may have no
    INT8 kernel, so the engine is not started; `_load_dir` is the code its `__init__` runs
    before vLLM is touched."""
    engine = RolloutEngine.__new__(RolloutEngine)
    engine.model_dir, engine.quant, engine.scheme, engine.mode = tiny_qwen3_moe, QuantConfig("int8"), "int8", "kernel"
    with pytest.raises(ValueError, match="pass export_dir=prepare_export"):
        engine._load_dir(None)
    with pytest.raises(FileNotFoundError, match="holds no export"):
        engine._load_dir(tmp_path)
    export = prepare_export(tiny_qwen3_moe, QuantConfig("int8"), engines_on_gpu=True, cache_root=tmp_path / "c")
    assert engine._load_dir(export) == export
    engine.mode = "emulate"
    assert engine._load_dir(None) == tiny_qwen3_moe
