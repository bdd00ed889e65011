"""The training entry point: configs parse, bad input is refused, short runs train and record."""

from __future__ import annotations

import json

import pytest
import torch

from qerl_rollout import train
from qerl_rollout.config import CONFIG_DIR, TrainConfig, load_config
from qerl_rollout.sync.verify import VERIFY_TOL
from qerl_rollout.tracking import read_metrics


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_parses(path):
    gpu_run = ["model.path=/models/q", "task.path=/data/math.jsonl"]   # the GPU configs require both
    required = {"grpo_qwen3_30b": gpu_run, "grpo_qwen3_30b_nvfp4": gpu_run, "grpo_qwen3_8b": gpu_run}
    cfg = load_config([f"config={path.stem}", *required.get(path.stem, [])])
    assert isinstance(cfg, TrainConfig) and cfg.name == path.stem
    assert cfg.grpo.group_size == cfg.rollout.group_size


def test_overrides_and_their_errors():
    cfg = load_config(["config=grpo_tiny_cpu", "policy.lr=0.5", "rollout.scheme=nvfp4"])
    assert (cfg.policy.lr, cfg.rollout.scheme) == (0.5, "nvfp4")
    with pytest.raises(ValueError, match="lrr"):
        load_config(["config=grpo_tiny_cpu", "policy.lrr=1"])
    with pytest.raises(ValueError, match="policy.lr"):
        load_config(["config=grpo_tiny_cpu", "policy.lr=fast"])
    with pytest.raises(ValueError, match="unknown quant scheme"):
        load_config(["config=grpo_tiny_cpu", "rollout.scheme=int3"])
    with pytest.raises(ValueError, match="model.path"):
        load_config(["config=grpo_qwen3_30b"])
    # One key for the GRPO group: rollout.group_size sets it, grpo.group_size is refused with a pointer.
    assert load_config(["config=grpo_tiny_cpu", "rollout.group_size=4"]).grpo.group_size == 4
    with pytest.raises(ValueError, match="grpo.group_size is rollout.group_size"):
        load_config(["config=grpo_tiny_cpu", "grpo.group_size=4"])
    with pytest.raises(ValueError, match="temperature"):
        load_config(["config=grpo_tiny_cpu", "rollout.temperature=0"])
    with pytest.raises(ValueError, match="max_model_len"):
        load_config(["config=grpo_tiny_cpu", "rollout.max_tokens=512"])
    with pytest.raises(FileNotFoundError, match="grpo_tiny_cpu"):
        load_config(["config=no_such_config"])


def test_cli_refuses_bad_input(tmp_path, capsys):
    assert train.main(["policy.lrr=1"]) == 2
    assert "lrr" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    argv = [f"run.output_dir={tmp_path}", "tracking.run_name=taken", "run.steps=1"]
    assert train.main(argv) == 2
    assert "not empty" in capsys.readouterr().err


def test_short_run_trains_pushes_and_records(tmp_path, capfd):
    argv = [f"run.output_dir={tmp_path}", "tracking.run_name=r", "run.steps=3", "run.router_stats_every=3",
            "placement.mode=local", "rollout.prompts_per_step=4", "tracking.wandb_mode=offline",
            "sync.verify_every=2"]
    assert train.main(argv) == 0
    run_dir = tmp_path / "r"
    # A quiet start: one line per engine on the console, vLLM's start-up and per-push INFO in vllm.log.
    out, err = capfd.readouterr()
    assert (out + err).count("engine ready in ") == 2      # the rollout engine and the BF16 eval twin
    assert "Initializing a V1 LLM engine" not in out + err and "Reloading weights" not in out + err
    # The twin's start in the same process re-registers vLLM's kernels (a warning each, not shown);
    # wandb says one line of ours instead of its seven (its version, tips, Weave ads).
    assert "already registered" not in err and "reduce_op" not in err
    assert "wandb: " not in err and err.count("wandb offline run ") == 1
    vllm_log = (run_dir / "vllm.log").read_text()
    assert "Initializing a V1 LLM engine" in vllm_log
    # vLLM says "Reloading weights inplace" once per process (info_once: absent from a later run
    # in the same process, as in the suite); it logs the prefix-cache reset of every commit: the
    # first push, one per step, and the BF16 twin's push before the last step's eval: 1 + 3 + 1.
    assert vllm_log.count("Successfully reset prefix cache") == 5
    rows = _check_three_steps(run_dir, "local")
    # The push check ran on the first push and on step 2's, both halves, within the tolerance.
    assert ["sync/verify_hash_ok" in r for r in rows] == [True, True, False]
    for row in rows[:2]:
        assert row["sync/verify_hash_ok"] == 1.0 and row["sync/verify_repushed"] == 0
        assert 0 <= row["sync/verify_mean_dlogp"] <= row["sync/verify_max_dlogp"]
        assert row["sync/verify_mean_dlogp"] < VERIFY_TOL
    # Routers stay BF16; only the quantized layers below them move their inputs a little. With
    # k = 2 a flipped token loses one or two of its experts: 1 - agreement <= flips <= 2 (1 - agreement).
    assert "router/topk_agreement" not in rows[1]
    agreement, flips = rows[2]["router/topk_agreement"], rows[2]["router/flip_rate"]
    assert 0.5 <= agreement <= 1.0 and 1 - agreement <= flips + 1e-12 <= 2 * (1 - agreement) + 2e-12
    assert {"experts/rollout/load_cv", "router/flip_rate/layer1"} <= rows[2].keys()
    assert json.loads((run_dir / "summary.json").read_text())["routing/source"] == "prefill"
    # experts.jsonl (the report's heatmaps): every real token once per layer in the trainer; the
    # rollout's routes cover every token but each sequence's last (32 sequences, k = 2).
    lines = [json.loads(x) for x in (run_dir / "experts.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and [x["rollout"] is None for x in lines] == [True, True, False]
    trainer, rollout = ([sum(layer) for layer in lines[2][side]] for side in ("trainer", "rollout"))
    assert len(set(trainer)) == 1 and rollout == [t - 2 * 32 for t in trainer]
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("placement", ["split", "colocated"])
def test_two_trainer_workers_and_two_engines_run(tmp_path, placement, caplog):
    """The tiny run on Ray: 2 FSDP2 ranks (gloo), 2 engines, and under split the held-out
    eval's BF16 engine too (a bundle of its own). Split pushes over the gloo group
    (`rollout.transport=collective`), colocated through the object store ("auto" on one node)."""
    evaluate = delta = placement == "split"
    argv = [f"run.output_dir={tmp_path}", "tracking.run_name=r", "run.steps=3", "run.router_stats_every=2",
            f"placement.mode={placement}", "trainer.num_workers=2", "rollout.num_engines=2",
            "rollout.prompts_per_step=4", f"eval.every={3 if evaluate else 0}",
            "tracking.wandb_mode=disabled", f"sync.delta={delta}", f"sync.verify_every={1 if delta else 50}",
            f"rollout.transport={'collective' if placement == 'split' else 'auto'}"]
    if delta:   # a step small enough that most codes stay: the pushes after the first are patches
        argv.append("policy.lr=1e-5")
    with caplog.at_level("INFO", logger="qerl_rollout.placement.ray"):
        assert train.main(argv) == 0
    transport = "collective" if placement == "split" else "object_store"
    assert f"weights travel to the engines by {transport}" in caplog.text
    run_dir = tmp_path / "r"
    rows = _check_three_steps(run_dir, placement)
    # Both engines' routes reach both ranks, whose counts are all-reduced: on step 2 only.
    assert ["router/flip_rate" in r for r in rows] == [False, True, False]
    assert 0.5 <= rows[1]["router/topk_agreement"] <= 1.0 and "experts/rollout/dead/layer0" in rows[1]
    if evaluate:
        assert rows[2]["eval/reward_gap"] == pytest.approx(rows[2]["eval/reward_bf16"] - rows[2]["eval/reward"])
    workers = json.loads((run_dir / "workers.json").read_text())
    assert [w["rank"] for w in workers["trainer"]] == [0, 1]
    assert len({w["pid"] for w in workers["trainer"]}) == 2 and len(workers["rollout"]) == 2
    assert len(workers["baseline"]) == int(evaluate)
    from qerl_rollout import checkpoint

    state, path = checkpoint.latest(run_dir)     # each rank wrote its own shard file
    assert state.step == 3 and sorted(p.name for p in (path / "trainer").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    assert ("no sleep mode" in caplog.text) == (placement == "colocated")
    # Each engine actor's vLLM logs are in the run directory, from its first line.
    for engine in ["engine-0", "engine-1"] + ["baseline-engine-0"] * evaluate:
        assert "Initializing a V1 LLM engine" in (run_dir / f"vllm.{engine}.log").read_text()
    # The first push's check: both engines hold exactly what was sent; a 2-rank trainer holds no
    # whole policy, so the logits half does not run there.
    assert rows[0]["sync/verify_hash_ok"] == 1.0 and "sync/verify_max_dlogp" not in rows[0]
    if delta:   # split: delta pushes over the gloo group to both engines, each checked by hash
        assert [r["sync/verify_hash_ok"] for r in rows] == [1.0] * 3
        assert rows[0]["sync/delta_ratio"] == 1.0 and all(r["sync/delta_ratio"] < 0.9 for r in rows[1:])


def _check_three_steps(run_dir, placement: str) -> list[dict]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Step k samples from the weights of push k-1 and its own push publishes version k.
    assert [r["rollout/version"] for r in rows] == [0, 1, 2]
    assert [r["sync/version"] for r in rows] == [1, 2, 3]
    assert rows[1]["sync/mb"] < rows[0]["sync/mb"]            # delta pushes after the first
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)
    assert all(0 < r["rollout_corr/k3_kl"] < 1e-2 for r in rows)   # the engines serve the trainer's policy
    assert json.loads((run_dir / "config.json").read_text())["placement"]["mode"] == placement
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    return rows


def test_aqn_noise_follows_the_schedule_and_never_touches_its_input():
    """`norm_noise` is what the loop passes to every push (the one place the schedule is read)."""
    from qerl_rollout.rl.aqn import norm_noise

    cfg = load_config(["config=grpo_tiny_cpu", "aqn.enabled=true", "run.steps=20"])
    assert norm_noise(cfg.aqn, 20, 0) is None and norm_noise(cfg.aqn, 20, 1) is None  # first of K=10
    spec = norm_noise(cfg.aqn, 20, 2)
    assert spec.sigma == pytest.approx(1e-2) and spec == norm_noise(cfg.aqn, 20, 2)    # one seed per step
    w = torch.ones(256, dtype=torch.bfloat16)
    noisy = spec.transform()("model.layers.0.input_layernorm.weight", w)
    assert torch.equal(w, torch.ones(256, dtype=torch.bfloat16))
    assert torch.equal(noisy, spec.transform()("model.layers.0.input_layernorm.weight", w))  # every rank alike
    # sigma 1e-2 at interval 1: BF16 spacing at 1.0 is 2^-7, so most entries move.
    assert (noisy != w).float().mean() > 0.3
    assert load_config(["config=grpo_tiny_cpu"]).aqn.enabled is False


def test_a_failing_step_closes_the_engine_and_marks_the_run_failed(tmp_path, monkeypatch):
    closed = []
    from qerl_rollout.placement import local

    real_local = local.LocalRollout

    class Recorded(real_local):
        def close(self):
            closed.append(True)
            super().close()

    def broken_step(self, *args, **kwargs):
        raise RuntimeError("optimizer exploded")

    monkeypatch.setattr(local, "LocalRollout", Recorded)
    monkeypatch.setattr("qerl_rollout.rl.policy.Policy.train_step", broken_step)
    cfg = load_config(["config=grpo_tiny_cpu", f"run.output_dir={tmp_path}",
                       "tracking.run_name=r", "run.steps=2", "tracking.wandb_mode=disabled"])
    with pytest.raises(RuntimeError, match="optimizer exploded"):
        train.run(cfg)
    assert closed == [True, True]    # the rollout engine and the BF16 one of eval.bf16
    assert read_metrics(tmp_path / "r") == []


def _drop_one_layer(engine_module, monkeypatch):
    """A transport that loses `model.layers.1.self_attn.o_proj` on every push."""
    load = engine_module.RolloutEngine.load
    monkeypatch.setattr(engine_module.RolloutEngine, "load", lambda self, bucket: load(
        self, [(n, t) for n, t in bucket if "layers.1.self_attn.o_proj." not in n]))


def _corrupt_after_arrival(engine_module, monkeypatch):
    """An engine that receives the right bytes but loads one layer wrong (what a stale kernel
    cache looks like from outside): the hash half passes, the logits half must not."""
    decode = engine_module.decode_payload

    def decode_wrong(payload, plan, shapes):
        return [(n, t * 2 if n == "model.layers.0.self_attn.o_proj.weight" else t)
                for n, t in decode(payload, plan, shapes)]

    monkeypatch.setattr(engine_module, "decode_payload", decode_wrong)


@pytest.mark.parametrize("fault, names", [(_drop_one_layer, "did not load 2 tensor(s)"),
                                          (_corrupt_after_arrival, "mean |dlogp|")])
def test_a_stale_engine_stops_the_run_at_the_first_check(tmp_path, monkeypatch, capsys, fault, names):
    """Induced staleness: the first push's check fails, the full re-push fails it again, the
    run stops with one line naming the engine and the platform, and nothing of that step is
    recorded. A working engine logs the same check within the tolerance (the short run above)."""
    import qerl_rollout.rollout.engine as engine_module

    fault(engine_module, monkeypatch)
    argv = [f"run.output_dir={tmp_path}", "tracking.run_name=r", "run.steps=2",
            "rollout.prompts_per_step=2", "eval.every=0", "tracking.wandb_mode=disabled"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("CPU ")                 # the platform, first
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert "the fp8_block/emulate engine does not serve the pushed weights (version 2" in line
    assert names in line and "vLLM platform" in line and "AMX" in line
    assert read_metrics(tmp_path / "r") == []


def test_a_skipped_kernel_cache_clear_stops_an_int8_run(tmp_path, monkeypatch, capsys):
    """The real staleness, induced: an INT8 kernel-mode run whose engine skips zentorch's cache
    clears after each reload serves the previous weights (measured: mean |dlogp| 0.17-0.30
    against the reference, 0.003-0.013 in sync). The push check must stop it at the first check.
    Only where vLLM runs zentorch's kernels (AMD Zen 4/5); elsewhere no kernel cache is kept by
    buffer address and skipping the clear changes nothing."""
    import qerl_rollout.rollout.engine as engine_module
    from qerl_rollout.hardware import cpu_facts

    if not cpu_facts().zen_platform_expected:
        pytest.skip("zentorch's kernels are not in use on this CPU")
    monkeypatch.setattr(engine_module, "clear_kernel_caches", lambda model=None: 0)
    argv = ["config=grpo_moe_cpu_int8", "model.tiny_size=tiny", f"run.output_dir={tmp_path}",
            "tracking.run_name=r", "run.steps=2", "rollout.prompts_per_step=4", "rollout.max_tokens=8",
            "rollout.baseline_every=0", "eval.every=0", "sync.verify_every=1", "tracking.wandb_mode=disabled"]
    assert train.main(argv) == 1
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("error: "))
    assert "the int8/kernel engine does not serve the pushed weights" in line and "mean |dlogp|" in line
    assert read_metrics(tmp_path / "r") == []


def test_int8_run_logs_the_rollout_speedup_it_measured(tmp_path):
    """The CPU int8 config (on the tiny model): kernel-mode rollouts, a BF16 baseline every 2 steps."""
    argv = ["config=grpo_moe_cpu_int8", "model.tiny_size=tiny", f"run.output_dir={tmp_path}",
            "tracking.run_name=r", "run.steps=2", "rollout.prompts_per_step=4",
            "rollout.max_tokens=8", "policy.micro_batch_size=64", "tracking.wandb_mode=disabled"]
    assert train.main(argv) == 0
    rows = read_metrics(tmp_path / "r")
    assert "rollout/speedup_vs_bf16" not in rows[0]              # measured every 2nd step only
    assert rows[1]["rollout/speedup_vs_bf16"] > 0 and rows[1]["rollout/bf16_tokens_per_s"] > 0
    # INT8 costs ~4e-4 KL on this model (tests/rollout/test_baseline.py); a stale baseline > 0.05.
    assert 0 <= rows[1]["quant/kl_vs_bf16"] < 1e-2
    assert rows[1]["train/seconds"] > 0 and rows[1]["baseline/seconds"] > 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rollout/speedup_vs_bf16"] == rows[1]["rollout/speedup_vs_bf16"]


def test_yaml_11_booleans_stay_strings_where_a_string_is_asked():
    """`tracking.run_name=off` used to name the run "False" (YAML 1.1 reads off/on/yes/no as
    booleans); a boolean field still reads them as booleans."""
    cfg = load_config(["tracking.run_name=off", "eval.bf16=on", "run.resume=No"])
    assert (cfg.tracking.run_name, cfg.eval.bf16, cfg.run.resume) == ("off", True, False)
    assert load_config(["tracking.run_name=yes"]).tracking.run_name == "yes"


def test_config_errors_name_the_keys():
    with pytest.raises(ValueError) as err:
        load_config(["policy.lora_rnak=2"])
    assert str(err.value) == ("unknown config key 'policy.lora_rnak'; did you mean policy.lora_rank "
                              "or policy.lora_alpha or policy.lora_dropout?")
    with pytest.raises(ValueError, match="^unknown config key 'rolout'; did you mean rollout\\?$"):
        load_config(["rolout.scheme=int8"])
    with pytest.raises(ValueError, match="policy.temperature=0.5 contradicts rollout.temperature=1.0"):
        load_config(["policy.temperature=0.5"])
    with pytest.raises(ValueError, match="policy.total_steps=7 contradicts run.steps=40"):
        load_config(["policy.total_steps=7"])
    assert load_config(["policy.seed=3", "run.seed=3"]).policy.seed == 3     # the same value is fine


def test_step_seeds_never_reuse_a_sample_stream():
    def streams(cfg):   # prompt i's sample k of a step: stream seed + i * n + k (RolloutEngine.generate)
        n, prompts = cfg.rollout.group_size, cfg.rollout.prompts_per_step
        return [train._step_seed(cfg, step) + i * n + k
                for step in range(1, 200) for i in range(prompts) for k in range(n)]

    cfg = load_config([])
    assert cfg.rollout.prompts_per_step > 1
    ours = streams(cfg)
    assert len(ours) == len(set(ours))
    assert not set(ours) & set(streams(load_config(["run.seed=1"])))


@pytest.mark.parametrize("overrides", [["mismatch.level=none"], ["rollout.scheme=bf16"]],
                         ids=["no-mismatch-correction", "bf16"])
def test_runs_that_used_to_crash(tmp_path, overrides):
    argv = [f"run.output_dir={tmp_path}", "tracking.run_name=r", "run.steps=2",
            "run.router_stats_every=1", "rollout.prompts_per_step=2", "tracking.wandb_mode=disabled",
            *overrides]
    assert train.main(argv) == 0
    rows = read_metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [1, 2]
    if "mismatch.level=none" in overrides:
        assert "mismatch/is_weight_mean" not in rows[1] and "rollout_corr/k3_kl" in rows[1]
        assert "router/topk_agreement" in rows[1]
    else:   # a BF16 rollout routes like the policy up to kernel rounding (measured >= 0.99)
        print({k: v for k, v in rows[1].items() if k.startswith("router/")})
        assert rows[1]["router/topk_agreement"] >= 0.95 and rows[1]["router/flip_rate"] <= 0.1


@pytest.mark.parametrize("precision", ["rollout.quant_targets=experts", "rollout.quant_overrides.experts=nvfp4"])
def test_a_run_with_per_module_precision(tmp_path, precision):
    """Per-module precision end to end: fp8_block experts beside BF16 attention, or NVFP4
    experts beside fp8_block attention. The engine holds what the trainer's QDQ reference of the
    same precision holds (the push check, both halves, on every push)."""
    argv = [f"run.output_dir={tmp_path}", "tracking.run_name=r", "run.steps=2", "rollout.prompts_per_step=2",
            precision, "sync.verify_every=1", "tracking.wandb_mode=disabled"]
    assert train.main(argv) == 0
    rows = read_metrics(tmp_path / "r")
    for row in rows:
        assert row["sync/verify_hash_ok"] == 1.0 and 0 <= row["sync/verify_mean_dlogp"] < VERIFY_TOL
    # The second push is compared with the first: the fraction of code rows it changed. LoRA
    # is on attention (and lm_head) only, so that is what it re-sends: quantized (fp8_block)
    # beside NVFP4 experts; BF16, with no codes to compare, beside quantized experts alone.
    assert "sync/changed_code_fraction" not in rows[0]
    if "quant_overrides" in precision:
        fraction = rows[1]["sync/changed_code_fraction/attention"]
        assert 0 < fraction <= 1 and rows[1]["sync/changed_code_fraction"] == fraction
    else:
        assert not any(k.startswith("sync/changed_code_fraction") for k in rows[1])
    with pytest.raises(ValueError, match="the bf16 scheme quantizes nothing"):
        load_config(["rollout.scheme=bf16", "rollout.bf16_layers=1"])
    with pytest.raises(ValueError, match="rollout.quant_targets / bf16_layers / quant_overrides: unknown quant targets 'mlp'"):
        load_config(["rollout.quant_targets=mlp"])
    with pytest.raises(ValueError, match="quant_overrides router=int8: router is never quantized"):
        load_config(["rollout.quant_overrides.router=int8"])
    with pytest.raises(ValueError, match="the bf16 scheme quantizes nothing"):
        load_config(["rollout.scheme=bf16", "rollout.quant_overrides.experts=int8"])


def test_held_out_prompts_never_appear_in_training():
    from qerl_rollout.rewards.synthetic import TASKS

    for task in TASKS.values():
        train_prompts = {r["prompt"] for r in task.rows(2000, seed=0)}
        eval_prompts = {r["prompt"] for r in task.rows(2000, seed=1, split="eval")}
        assert eval_prompts and train_prompts and not train_prompts & eval_prompts, task.name


def flaky_reward(prompt, response, answer=None, **meta):
    """A reward fn for the test below: raises on one response in three, NaN on another."""
    h = sum(map(ord, response)) % 3
    if h == 0:
        raise ValueError("cannot parse")
    return float("nan") if h == 1 else 1.0


def test_a_failing_or_non_finite_reward_is_counted_not_fatal(tmp_path, capsys):
    base = [f"run.output_dir={tmp_path}", "run.steps=2", "rollout.prompts_per_step=2",
            "task.reward=test_train:flaky_reward", "tracking.wandb_mode=disabled"]
    assert train.main([*base, "tracking.run_name=zero", "eval.every=2", "eval.bf16=false"]) == 0
    rows = read_metrics(tmp_path / "zero")
    assert sum(r["reward/errors"] for r in rows) > 0 and sum(r["reward/non_finite"] for r in rows) > 0
    # The held-out eval scores the same reward fn the same way (it used to end the run).
    assert rows[1]["eval/reward_errors"] > 0 and 0 <= rows[1]["eval/reward"] <= 1
    assert all(r["loss/policy"] is not None for r in rows)          # NaN kept out of the loss
    with pytest.raises(RuntimeError, match="the reward function failed on prompt"):
        train.main([*base, "tracking.run_name=raise", "task.reward_errors=raise", "eval.every=0"])
