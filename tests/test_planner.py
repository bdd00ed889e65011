"""`python -m qerl_rollout.plan`: the memory and push arithmetic, checked where it can be exact.

- Hand-derived: a 2-layer dense Qwen3 (hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocab
  256) has 2 x 16 384 embedding/head + 2 x 37 024 layer + 64 norm parameters; LoRA r 4 on
  q/k/v/o adds 2 x 1 792; its fp8_block export stores each of the 7 linears as N x K fp8
  bytes plus one bf16 scale per 128 x 128 block, the rest in BF16. The plan's table rows are
  those numbers divided as the docstring of `planner` says.
- Exact against the real thing: the engine bytes equal the bytes of the tensors a real export
  of the tiny Qwen3-MoE writes, for every scheme; the LoRA count equals a real `Policy`'s.
- The three GPU configs print a table and fit 80 GiB GPUs; on 32 GiB ones `grpo_qwen3_30b` is
  refused in one line naming the rank, the component and the GiB, exit status 1.
- The activation terms against what autograd really saves in a training forward (three
  families, LoRA on attention or on the experts, checkpointing), and a step's measured peak
  RSS against the plan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from one_step import policy_config
from safetensors import safe_open

from qerl_rollout.config import load_config
from qerl_rollout.planner import GIB, activation_parts, count, model_config, plan
from qerl_rollout.quant import SCHEMES
from qerl_rollout.quant.export import export_checkpoint
from qerl_rollout.rl.policy import Policy, TokenBatch

DENSE = {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 256,
         "max_position_embeddings": 512, "tie_word_embeddings": False}


def _tiny_cfg(*overrides):
    return load_config(["config=grpo_tiny_cpu", "policy.target_modules=[q_proj,k_proj,v_proj,o_proj]",
                        "policy.lora_rank=4", *overrides])


def test_dense_counts_by_hand():
    cfg = _tiny_cfg()
    c = count(DENSE, cfg.policy, "fp8_block")
    linears = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (N, K): q k v o gate up down
    per_layer = sum(n * k for n, k in linears) + 16 + 16 + 64 + 64        # + q_norm, k_norm, 2 RMSNorms
    assert per_layer == 37_024
    assert c.base_params == 2 * 256 * 64 + 2 * per_layer + 64
    assert c.layer_params == per_layer
    assert c.lora_params == 2 * (4 * (64 + 64) + 2 * 4 * (64 + 32) + 4 * (64 + 64))  # q, k, v, o
    fp8 = sum(n * k + 2 for n, k in linears)                              # every linear is one 128x128 block
    bf16 = 2 * (2 * 256 * 64 + 2 * (16 + 16 + 64 + 64) + 64)
    assert c.engine_bytes == 2 * fp8 + bf16
    attention = sum(n * k + 2 for n, k in linears[:4]) + 2 * (16 + 16)   # the self_attn unit, q/k norms in it
    assert c.delta_bytes == 2 * attention


def test_the_table_divides_as_documented():
    cfg = _tiny_cfg("placement.mode=colocated", "trainer.num_workers=2", "rollout.num_engines=2",
                    "run.router_stats_every=0", "rollout.gpu_memory_utilization=0.5")
    c = count(DENSE, cfg.policy, "fp8_block")
    p = plan(cfg, c, gpu_gib=1.0, gbps=1.0)
    rows = {r["component"]: r["gib"] * GIB for r in p.rows}
    assert rows["BF16 weights (1/N)"] == c.base_params * 2 / 2
    assert rows["AdamW moments (1/N)"] == c.lora_params * 8 / 2
    assert rows["one layer all-gathered (BF16)"] == c.layer_params * 2
    # A save writes each rank's shards: its peak is the step's state without the activations.
    step = sum(r["gib"] for r in p.rows if r["role"] == "trainer rank")
    assert p.peaks["trainer rank (save)"] == pytest.approx(step - rows["activations (one micro-batch)"] / GIB)
    assert rows["weights (fp8_block, TP 1)"] == c.engine_bytes
    assert rows[next(k for k in rows if k.startswith("KV cache"))] == 0.5 * GIB - c.engine_bytes
    tokens = int((0.5 * GIB - c.engine_bytes) // (2 * 2 * 2 * 16 * 2))    # 2 x layers x KV heads x head_dim x bf16
    assert f"KV cache ({tokens} tokens)" in rows
    # The push holds the trainer without its activations and the engine's weights, not its KV cache.
    activations = rows["activations (one micro-batch)"]
    assert p.peaks["colocated: push phase"] == pytest.approx(
        p.peaks["trainer rank (step)"] - activations / GIB + c.engine_bytes / GIB)
    assert p.push["delta_s"] == pytest.approx(c.delta_bytes / 1e9)
    # Only rank 0 reads the model (the other builds on meta); tied embeddings: both ranks read it.
    assert p.peaks["host RAM of rank 0's node (model load)"] == pytest.approx(c.base_params * 2 / GIB)
    tied = count({**DENSE, "tie_word_embeddings": True}, cfg.policy, "fp8_block")
    assert tied.tied and plan(cfg, tied, gpu_gib=1.0).peaks["host RAM of rank 0's node (model load)"] == \
        pytest.approx(2 * tied.base_params * 2 / GIB)
    # Tied, the lm_head (256 x 64, BF16 in the engine) is the embedding: stored once, counted once.
    assert (tied.base_params, tied.engine_bytes) == (c.base_params - 256 * 64, c.engine_bytes - 256 * 64 * 2)
    assert p.refusal is None


def test_local_engines_share_the_gpu_with_the_trainer():
    """Local on a GPU: the trainer and the process's engines on one GPU; with the BF16 baseline
    (eval.bf16, the tiny config's default) the two engines share `gpu_memory_utilization`."""
    cfg = _tiny_cfg("rollout.gpu_memory_utilization=0.5")
    assert cfg.placement.mode == "local" and cfg.engines_per_local_gpu == 2
    c = count(DENSE, cfg.policy, "fp8_block")
    p = plan(cfg, c, gpu_gib=1.0)
    rows = {r["component"]: r["gib"] * GIB for r in p.rows}
    assert rows[next(k for k in rows if k.startswith("KV cache"))] == 0.25 * GIB - c.engine_bytes
    assert p.peaks["local: trainer + engines"] == pytest.approx(p.peaks["trainer rank (step)"] + 0.5)
    assert p.refusal is None
    small = plan(cfg, c, gpu_gib=p.peaks["trainer rank (step)"] * 1.5)   # 0.5 of it for vLLM: over
    assert small.refusal.startswith("local: trainer ") and "(rollout.gpu_memory_utilization)" in small.refusal
    assert _tiny_cfg("eval.bf16=false").engines_per_local_gpu == 1
    # The BF16 baseline holds the same weights in BF16 in the other half of the share.
    assert rows["weights (bf16, TP 1)"] == c.bf16_engine_bytes > c.engine_bytes
    baseline_kv = [r["gib"] * GIB for r in p.rows if r["role"] == "baseline engine (BF16)"][1]
    assert baseline_kv == 0.25 * GIB - c.bf16_engine_bytes
    # A utilization whose half holds the fp8 engine but not the BF16 one: the baseline is refused.
    between = f"rollout.gpu_memory_utilization={(c.engine_bytes + c.bf16_engine_bytes) / GIB}"
    refused = plan(_tiny_cfg(between), c, gpu_gib=1.0).refusal
    assert refused.startswith("baseline engine (BF16): weights ") and "in its half of" in refused
    assert plan(_tiny_cfg(between, "eval.bf16=false"), c, gpu_gib=1.0).refusal is None


@pytest.mark.parametrize("scheme", SCHEMES)
def test_engine_bytes_equal_a_real_export(tiny_qwen3_moe, tmp_path, scheme):
    export_checkpoint(tiny_qwen3_moe, tmp_path / scheme, scheme, progress=False)
    written = 0
    for f in (tmp_path / scheme).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118
                t = st.get_tensor(key)
                written += t.numel() * t.element_size()
    cfg = _tiny_cfg()
    assert count(model_config(str(tiny_qwen3_moe), ""), cfg.policy, scheme).engine_bytes == written


def test_lora_count_equals_a_real_policy(tiny_qwen3_moe):
    pc = policy_config(tiny_qwen3_moe)
    real = sum(p.numel() for p in Policy(pc).model.parameters() if p.requires_grad)
    assert count(model_config(str(tiny_qwen3_moe), ""), pc, "fp8_block").lora_params == real


@pytest.mark.parametrize("name, gpu_gib, fits", [("grpo_qwen3_8b", 80, True), ("grpo_qwen3_30b_nvfp4", 80, True),
                                                 ("grpo_qwen3_30b", 80, True), ("grpo_qwen3_30b", 32, False)])
def test_the_gpu_configs_print_a_table(name, gpu_gib, fits, tmp_path, capsys):
    from qerl_rollout.plan import main

    status = main([f"config={name}", "--gpu-gib", str(gpu_gib), "--json", str(tmp_path / "plan.json")])
    out, err = capsys.readouterr()
    assert "trainer rank" in out and "engine (per TP rank)" in out and "push: full" in out
    table = json.loads((tmp_path / "plan.json").read_text())
    assert status == (0 if fits else 1) and (table["refusal"] is None) == fits
    if not fits:   # one line, naming the rank, the component and the GiB
        assert err.count("\n") == 1 and err.startswith("does not fit: trainer rank: 42.3 GiB of a 32 GiB GPU")
        assert "(largest: activations (one micro-batch), 22.2 GiB)" in err


def test_no_model_to_plan_is_one_line(capsys):
    from qerl_rollout.plan import main

    assert main(["config=grpo_qwen3_8b", "model.shape=nope"]) == 2
    assert "set model.path, or model.shape to one of ['qwen3_30b_a3b', 'qwen3_8b']" in capsys.readouterr().err


def test_train_plans_a_gpu_run_first_and_refuses_one_that_does_not_fit(tmp_path, capsys):
    """`train` runs the plan before anything starts: before the run directory, Ray or an engine.
    The 8B run's trainer rank needs 25.6 GiB (the table of the test above), so 16 GiB GPUs
    refuse it in one line and leave no run directory behind; the CPU config has nothing to plan."""
    from qerl_rollout import train

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(model_config("", "qwen3_8b")))
    runs = tmp_path / "runs"
    argv = ["config=grpo_qwen3_8b", f"model.path={model}", f"task.path={tmp_path / 'math.jsonl'}",
            f"run.output_dir={runs}", "placement.gpu_gib=16"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: does not fit: trainer rank: 25.6 GiB of a 16 GiB GPU")
    assert not runs.exists()
    fits = train._memory_plan(load_config(argv[:3] + [f"run.output_dir={runs}"]))
    assert fits.refusal is None and fits.peaks["trainer rank (step)"] == pytest.approx(25.61, abs=0.01)
    assert train._memory_plan(load_config([])) is None


def _saved_by_autograd(policy, batch) -> int:
    """Bytes of the distinct storages autograd saves in one training forward (parameters aside)."""
    params = {p.untyped_storage().data_ptr() for p in policy.model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    policy.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        policy._forward(batch)
    return sum(saved.values())


EXPERT_LORA = "policy.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("overrides", [[], [EXPERT_LORA], ["policy.gradient_checkpointing=true"]],
                         ids=["attention-lora", "expert-lora", "checkpointing"])
def test_activations_equal_what_autograd_saves(tiny_model, family, overrides):
    """The plan's saved activations (`layers` + `head`) against the bytes autograd really keeps
    after a training forward. Within 1%: the terms the plan leaves out (the mask, position ids,
    per-expert token counts) are measured at 0.2-0.7% on these models, less on larger ones."""
    model = tiny_model(family)
    rows, prompt, response = 4, 48, 16
    cfg = load_config(["config=grpo_tiny_cpu", f"model.path={model}", f"policy.micro_batch_size={rows}",
                       f"task.max_prompt_tokens={prompt}", f"rollout.max_tokens={response}", *overrides])
    part = activation_parts(cfg, count(model_config(str(model), ""), cfg.policy, "fp8_block"))
    g = torch.Generator().manual_seed(0)
    batch = TokenBatch.from_token_lists([torch.randint(3, 1000, (prompt,), generator=g).tolist() for _ in range(rows)],
                                        [torch.randint(3, 1000, (response,), generator=g).tolist() for _ in range(rows)], 0)
    measured = _saved_by_autograd(Policy(replace(cfg.policy, model_path=str(model))), batch)
    assert measured / (part["layers"] + part["head"]) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("checkpointing, low, high", [("0", 0.95, 1.15), ("1", 0.85, 1.1)])
def test_a_steps_measured_peak_is_what_the_plan_says(tiny_qwen3_moe, checkpointing, low, high):
    """A GRPO step of 16 x 256 tokens in a fresh process: its peak RSS above the loaded model
    against the plan's activations + LoRA grads + AdamW moments. Measured on an AMD EPYC:
    1.07-1.09 without checkpointing (the RSS also holds the allocator's and autograd's own
    buffers, a few MiB), 0.99 with it (the plan adds one recomputed layer whole to the
    forward's peak). The bounds leave ~5% of run-to-run noise either side.

    The plan counts tensors; kernel workspace is not a tensor. oneDNN's AVX-512 / AMX BF16
    kernels hold 30-45 MiB of it at this size (measured on an Intel Xeon with AMX: 1.31x without
    checkpointing, 1.52x with it; 1.06x and 1.01x with ONEDNN_MAX_CPU_ISA=AVX2), so the step
    runs on oneDNN's AVX2 kernels, the path an AVX2-only CPU takes anyway: every CPU then
    measures the same thing. Not measured here: split ranks (their activations are the same per
    micro-batch, their weights the 1/N the checkpoint bench measures) and the 430M model (one
    step takes 6 minutes on 2 cores)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("plan_rss.py")), str(tiny_qwen3_moe),
                          checkpointing], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert low <= figures["measured_mib"] / figures["planned_mib"] <= high, figures
