"""INT8 kernel mode on this CPU: vLLM's real quantized kernels, and pushes equal to fresh loads.

For each MoE family whose generation works on vLLM-CPU, an engine serving INT8 W8A8 through
vLLM's kernels where the CPU has them (AMX, or AVX-512 with zentorch: a machine that has them
and still emulates fails this test) takes three consecutive pushes from a peft policy with LoRA on attention and
on the fused experts: a full push, a delta push after every adapter changed, and a delta push
after only the attention adapters changed (the experts do not travel). After each push the
engine's prompt logprobs and a greedy continuation equal, exactly, those of a fresh engine
started in its own process on an independently written checkpoint: the merged BF16 weights
saved with `save_pretrained` and quantized by the export path (`quant.export`, held bit-exact
with compressed-tensors by tests/quant). A tolerance here would hide a stale-weights bug: two
fresh loads of one checkpoint differ by exactly 0. On a CPU without INT8 kernels (an AVX2-only
AMD EPYC) the same three pushes go to the emulated int8 engine. The same runs for a BF16 engine, the other
engine a run holds, since kernel weight caches (zentorch) reach BF16 layers too: in the pytest
process, beside an INT8 engine taking the same pushes, as a run's baseline lives. And once for
an INT8 engine with vLLM tensor parallelism (TP 2: two CPU workers, one core each through
VLLM_CPU_OMP_THREADS_BIND), whose pushed tensors each worker shards with vLLM's own weight
loaders, against a fresh TP 2 engine. Two cases push in the quantized domain (`sync.delta`):
their second and third pushes move a few rows of every adapter and send only the changed
blocks of the engine's tensors (`wire.delta`), which the engine applies to its copies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qerl_rollout import QuantConfig, RolloutEngine, WeightSync
from qerl_rollout.hardware import cpu_facts, cpu_line
from qerl_rollout.rollout.engine import kernel_supported, prepare_export, resolve_mode
from qerl_rollout.sync.merge import merged_named_tensors

sys.path.insert(0, str(Path(__file__).parent))
from fresh_engine import TARGETS_ENV, TP_ENV, engine_numbers, engine_options, engine_quant  # noqa: E402
from test_engine_sync import lora_policy  # noqa: E402

FRESH = Path(__file__).with_name("fresh_engine.py")
# (family, scheme, TP, quant targets[,overrides], delta pushes); the last two: INT8 experts
# beside BF16 attention in one engine (`rollout.quant_targets=experts`), and NVFP4 experts
# beside FP8 attention (`rollout.quant_overrides`: emulated, no CPU has both kernels).
CASES = [("qwen3_moe", "int8", 1, "all_linear", True), ("qwen2_moe", "int8", 1, "all_linear", False),
         ("mixtral", "int8", 1, "all_linear", False), ("qwen3_moe", "bf16", 1, "all_linear", False),
         ("qwen3_moe", "int8", 2, "all_linear", False), ("qwen3_moe", "int8", 1, "experts", False),
         ("qwen3_moe", "fp8_block", 1, "all_linear,experts=nvfp4", True)]
TP_BIND = {2: "0|1"}   # one core per TP worker (vLLM-CPU's auto-bind wants a NUMA node per worker)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def int8_kernels_expected() -> bool:
    """From the CPU's own flags: AMX (Intel), or AVX-512 + zentorch (vLLM's Zen platform)."""
    facts = cpu_facts()
    return facts.amx or facts.zen_platform_expected


def test_int8_kernels_exist_exactly_where_the_cpu_has_them():
    """Kernel mode where the CPU has INT8 kernels; elsewhere a refusal that says why, and
    `auto` emulates (the push tests below then check the emulated int8 engine instead)."""
    ok, why = kernel_supported("int8")
    assert ok == int8_kernels_expected(), f"{cpu_line()}: kernel_supported says {ok} ({why})"
    if ok:
        assert resolve_mode(QuantConfig("int8")) == "kernel"
        return
    assert "AMX" in why and "AVX-512" in why, why
    assert resolve_mode(QuantConfig("int8")) == "emulate"
    with pytest.raises(ValueError, match="kernel mode for int8 is not available"):
        resolve_mode(QuantConfig("int8", "kernel"))


def _perturb(policy, seed: int, only: str | None = None, rows: slice | None = None) -> None:
    """New random LoRA B factors (all adapters, or those whose name contains `only`); with
    `rows`, only those rows of each (only those rows of the merged weights move)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name and (only is None or only in name):
                part = p if rows is None else p[..., rows, :]
                part.copy_(torch.randn(part.shape, generator=g) * 0.2)


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


def _tp_env(tp: int) -> dict:
    if tp == 1:
        return dict(os.environ)
    return {**os.environ, TP_ENV: str(tp), "VLLM_CPU_OMP_THREADS_BIND": TP_BIND[tp]}


def _fresh(checkpoints: list[Path], scheme: str, tp: int = 1) -> list[dict]:
    """Fresh-engine numbers of each checkpoint, each from its own process (two at a time)."""
    results = []
    for i in range(0, len(checkpoints), 2):
        procs = [(ck, subprocess.Popen([sys.executable, str(FRESH), str(ck), scheme, str(ck / "fresh.json")],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=_tp_env(tp)))
                 for ck in checkpoints[i:i + 2]]
        for ck, proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads((ck / "fresh.json").read_text()))
    return results


def push_three_times(model_dir: Path, family: str, scheme: str, out_dir: Path, beside: str | None = None,
                     delta: bool = False, after: Path | None = None) -> dict:
    """Engine numbers before and after each of the three pushes, the pushes' reports, and the
    merged checkpoint written after each push. `beside`: a second engine of that scheme lives
    in the same process and takes the same pushes first (a run's rollout engine beside its
    BF16 baseline). `delta`: delta pushes, and updates that move rows 1-2 of each adapter.
    `after`: first two engines on that checkpoint (other weights, the same shapes) serve and
    close in this process, one after the other, as a run's earlier engines do."""
    quant = engine_quant(scheme)
    for _ in range(2 if after is not None else 0):
        earlier = RolloutEngine(after, quant, max_model_len=256)
        engine_numbers(earlier)
        earlier.close()
    engine = RolloutEngine(model_dir, quant, max_model_len=256, export_dir=prepare_export(model_dir, quant),
                           **engine_options())
    neighbours = [RolloutEngine(model_dir, QuantConfig(beside), max_model_len=256,
                                export_dir=prepare_export(model_dir, QuantConfig(beside)))] if beside else []
    mode = engine.mode
    manifest = engine.manifest()
    q_dtype = manifest["model.layers.0.self_attn.q_proj.weight"][1]
    expert_dtype = next(dtype for name, (_, dtype) in manifest.items() if ".experts." in name and name.endswith(".weight"))
    policy = lora_policy(model_dir, family=family)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    sync = WeightSync(engine, delta=delta)
    neighbour_syncs = [WeightSync(e) for e in neighbours]
    pushed, checkpoints, reports = [], [], []
    before = engine_numbers(engine)
    for step, only in enumerate([None, None, "self_attn"]):
        if step:
            _perturb(policy, seed=step, only=only, rows=slice(1, 3) if delta else None)
        for other in neighbour_syncs:
            other.push(policy)
        r = sync.push(policy)
        reports.append({"version": r.version, "full": r.full, "bytes_sent": r.bytes_sent,
                        "bytes_whole": r.bytes_whole})
        pushed.append(engine_numbers(engine))
        checkpoints.append(str(_write_merged(policy, base, model_dir, out_dir / f"step{step}")))
    engine.close()
    for other in neighbours:
        other.close()
    return {"mode": mode, "q_dtype": str(q_dtype), "expert_dtype": str(expert_dtype), "before": before, "pushed": pushed,
            "reports": reports, "checkpoints": checkpoints}


def _in_own_process(model_dir: Path, family: str, scheme: str, out_dir: Path, tp: int = 1) -> dict:
    out = out_dir / "pushed.json"
    run = subprocess.run([sys.executable, __file__, str(model_dir), family, scheme, str(out_dir)],
                         capture_output=True, text=True, timeout=600, check=False, env=_tp_env(tp))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("family, scheme, tp, targets, delta", CASES)
def test_pushes_equal_a_fresh_load(tiny_model, tmp_path, monkeypatch, family, scheme, tp, targets, delta):
    monkeypatch.setenv(TARGETS_ENV, targets)       # this process's engines and the fresh ones
    model_dir = tiny_model(family)
    if tp > 1:               # vLLM's TP workers are processes of their own, bound to cores
        got = _in_own_process(model_dir, family, scheme, tmp_path, tp)
    elif scheme != "bf16":   # in this process, after the other engines of the suite
        got = push_three_times(model_dir, family, scheme, tmp_path, delta=delta)
    else:
        # The production case: a run's BF16 baseline in the process of its INT8 rollout engine,
        # after the suite's other engines. Once (1 suite run in 3, Intel) its second push was
        # 0.008 from a fresh load; since, 3 x 3 pushes after 5 other engines each were exact
        # (Intel Xeon with AMX). The check stays exact. Two engines on other weights served and
        # closed first: on AMD + zentorch, before kernel caches were cleared at start-up, a new
        # engine after two such served 0.07-0.17 (max |dlogp|) away from its own weights.
        got = push_three_times(model_dir, family, scheme, tmp_path, beside="int8", after=tiny_model(family, seed=1))
    kernel = scheme == "int8" and int8_kernels_expected()
    assert got["mode"] == ("kernel" if kernel else "emulate")
    assert got["q_dtype"] == str(torch.int8 if kernel and targets != "experts" else torch.bfloat16)
    if targets == "experts":   # the experts alone are INT8: attention stays BF16 in the engine
        assert got["expert_dtype"] == str(torch.int8 if kernel else torch.bfloat16)
    reports, pushed = got["reports"], got["pushed"]
    assert [r["version"] for r in reports] == [1, 2, 3]
    assert [r["full"] for r in reports] == [True, False, False]
    assert reports[2]["bytes_whole"] < 0.5 * reports[1]["bytes_whole"]   # experts stayed home
    for r in reports[1:]:     # a delta push sends only the changed blocks of what it touches
        assert (r["bytes_sent"] < 0.5 * r["bytes_whole"]) if delta else r["bytes_sent"] == r["bytes_whole"], r
    # TP engines start slowly on 2 cores: pushes 1 and 3 are compared there. Push 3 sends only
    # attention, so a wrong expert update in push 2 would still show in push 3's numbers.
    steps = [0, 2] if tp > 1 else [0, 1, 2]
    checkpoints = [Path(got["checkpoints"][i]) for i in steps]
    if scheme == "bf16":      # and the engine as started, before any push (see above)
        start = tmp_path / "start"
        start.mkdir()
        checkpoints.append(start)
        for f in model_dir.iterdir():
            (start / f.name).symlink_to(f)
    fresh_all = _fresh(checkpoints, scheme, tp)
    if scheme == "bf16":
        assert got["before"] == fresh_all.pop(), "a new engine differs from a fresh load in its own process"
    for step, fresh in zip(steps, fresh_all):
        assert fresh["mode"] == got["mode"]
        assert pushed[step] == fresh, f"push {step + 1} differs from a fresh load of the same weights"
    # ... and each push changed what the engine serves (the comparison can fail).
    assert got["before"]["score"] != pushed[0]["score"] != pushed[1]["score"] != pushed[2]["score"]


if __name__ == "__main__":   # `python test_kernel_mode.py MODEL_DIR FAMILY SCHEME OUT_DIR`
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    _model, _family, _scheme, _out = sys.argv[1:]
    _result = push_three_times(Path(_model), _family, _scheme, Path(_out))
    (Path(_out) / "pushed.json").write_text(json.dumps(_result))
