"""`python -m qerl_rollout.train [config=NAME|FILE.yaml] [section.key=value ...]`: a GRPO run.

How it works. The config (`qerl_rollout.config.TrainConfig`, default: the embedded tiny CPU
run `configs/grpo_tiny_cpu.yaml`) names a checkpoint (or a tiny model built in the run
directory), a rollout scheme, a task and the trainer's settings. `run` places the trainer
(`rl.policy.Policy`: BF16 + LoRA) and the rollout engines: in this process
(`placement.local`, placement.mode=local) or in Ray actors (`placement.ray`, split or
colocated: FSDP2 trainer ranks, several engines), behind one interface
(`placement.interface`), then repeats:

    prompts -> rollout.generate(n=group)     samples, rollout logprobs, weight version v
            -> reward per sample             task reward on the decoded response
            -> group_advantages              (r - mean_group) / std_group
            -> trainer.train_step            GRPO loss, token-level TIS vs the rollout logprobs
            -> trainer.push()                merge LoRA, requantize, stream: engines serve v+1
            -> tracker.log                   metrics.jsonl + wandb (offline by default)

The driver holds the data, the rewards and the loop; in Ray placements it holds no model.

The run directory (`run.output_dir/<run name>`) holds the resolved config, the metrics (and
for a MoE model each step's expert counts, experts.jsonl), the wandb files, the LoRA adapter
and checkpoints (`qerl_rollout.checkpoint`, every `run.save_every` steps, at the end and on
Ctrl-C). The same command with `run.resume=true`
continues from the newest complete checkpoint: trainer, optimizer, sampler and RNG restored,
the engine pushed the restored weights under the checkpointed version, metrics.jsonl cut back
to that step, the same wandb run resumed. Held-out evaluation runs every `eval.every` steps.
Left out: asynchronous (off-policy) rollouts overlapping the trainer's step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import ExitStack, closing
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    """Train for `cfg.run.steps` steps; returns the summary (also written to the run dir)."""
    from qerl_rollout.config import config_dict
    from qerl_rollout.rl import group_advantages
    from qerl_rollout.rl.aqn import norm_noise
    from qerl_rollout.rl.policy import TokenBatch
    from qerl_rollout.rl.routing import COUNTS_KEY
    from qerl_rollout.tracking import Tracker

    memory = _memory_plan(cfg)       # before the run dir: a refused layout leaves nothing behind
    run_dir = _run_dir(cfg)
    if memory is not None:
        (run_dir / "plan.json").write_text(json.dumps(memory.to_json(), indent=1))
    config = config_dict(cfg)
    model_dir = _model_dir(cfg, run_dir)
    routed = _routed(cfg, model_dir)
    tokenizer, sampler, reward_fn, eval_data = _task(cfg, model_dir)
    stop = [tokenizer.eos_token_id]
    resumed, resumed_dir = _resume(cfg, run_dir, config, sampler)   # refused here, before anything starts
    done, version = (resumed.step, resumed.engine_version) if resumed else (0, 0)
    with ExitStack() as resources:
        placement = resources.enter_context(closing(_place(cfg, model_dir, run_dir, routed)))
        trainer, rollout = placement.trainer, placement.rollout
        baseline = _baseline(cfg, placement)
        if resumed:
            from qerl_rollout import checkpoint

            trainer.load_state(resumed_dir / checkpoint.TRAINER)
            checkpoint.set_rng_state(resumed.rng)   # after the engines start: vLLM seeds torch
        tracker = resources.enter_context(Tracker(
            cfg.tracking, run_dir, config, resume_step=done if cfg.run.resume else None,
            wandb_id=resumed.wandb_id if resumed else None))
        if routed:
            tracker.summary({"routing/source": _routes_source(placement)})
        if resumed:   # the restored policy, as the killed run's engine served it, before any rollout
            trainer.push(noise=norm_noise(cfg.aqn, cfg.run.steps, done), version=version)
        check = _push_check(cfg, placement)
        if baseline and _measures(cfg, done + 1):
            baseline.push()      # later steps' baselines are pushed in the push phase before them
        try:
            for step in _progress(done, cfg.run.steps):
                placement.phase("rollout")
                t0 = time.perf_counter()
                prompts = sampler.next_batch()
                prompt_ids = [p.prompt_ids for p in prompts]
                sampling = dict(n=cfg.rollout.group_size, max_tokens=cfg.rollout.max_tokens,
                                stop_token_ids=stop, temperature=cfg.rollout.temperature,
                                seed=_step_seed(cfg, step))
                samples = rollout.generate(prompt_ids, routes=routed and _routes_due(cfg, step), **sampling)
                t1 = time.perf_counter()
                measured = {}
                if baseline and _measures(cfg, step):
                    measured = baseline.measure(rollout, prompt_ids, samples, **sampling)
                placement.phase("train")
                t1b = time.perf_counter()
                rewards, reward_stats = _rewards(samples, prompts, reward_fn, tokenizer,
                                                 cfg.task.reward_errors)
                batch, logp_rollout = TokenBatch.from_samples(samples, tokenizer.pad_token_id)
                advantages = group_advantages(rewards, cfg.grpo.group_size,
                                              norm_std=cfg.grpo.norm_adv_by_std, eps=cfg.grpo.adv_eps)
                metrics = trainer.train_step(batch, advantages, logp_rollout)
                _record_expert_counts(run_dir, step, metrics.pop(COUNTS_KEY, None))
                t2 = time.perf_counter()
                placement.phase("push")
                # This push serves the next step's rollouts: 0-based index `step` in AQN's schedule.
                verify = check.due(step)
                noise = norm_noise(cfg.aqn, cfg.run.steps, step)   # the AQN of the push serving `step`
                report = trainer.push(noise=noise, digest=verify)
                logged = _step_metrics(rewards, metrics, report, samples, t1 - t0, t2 - t1b)
                evaluating = eval_data is not None and (step % cfg.eval.every == 0 or step == cfg.run.steps)
                if baseline and (_measures(cfg, step + 1) or (evaluating and cfg.eval.bf16)):
                    baseline.push()      # while the trainer is on its device (colocated: this phase only)
                if verify:
                    logged.update(check.run(
                        trainer, rollout, report, samples, noisy=noise is not None,
                        push_again=lambda n=noise: _pushed_in_phase(placement, trainer, noise=n),
                        serve=lambda: placement.phase("rollout")))
                logged.update(measured)
                logged.update(reward_stats)
                if evaluating:
                    placement.phase("rollout")
                    logged.update(_eval_metrics(cfg, rollout, baseline, eval_data, reward_fn, tokenizer, stop))
                logged["step/seconds"] = time.perf_counter() - t0
                tracker.log(step, logged)
                _print_step(step, cfg.run.steps, logged)
                done, version = step, report.version
                if cfg.run.save_every and step % cfg.run.save_every == 0 and step < cfg.run.steps:
                    placement.phase("train")
                    _checkpoint(cfg, run_dir, done, version, trainer, sampler, tracker, config)
        except KeyboardInterrupt:
            if done > (resumed.step if resumed else 0):
                placement.phase("train")     # the trainer back on its device (colocated)
                path = _checkpoint(cfg, run_dir, done, version, trainer, sampler, tracker, config)
                print(f"interrupted: step {done} is checkpointed in {path}; continue with "
                      f"run.resume=true tracking.run_name={cfg.tracking.run_name}", file=sys.stderr)
            raise
        placement.phase("train")
        _checkpoint(cfg, run_dir, done, version, trainer, sampler, tracker, config)
        trainer.save_adapter(run_dir / "adapter")
        summary = _summary(run_dir)
        summary["report"] = str(_report(run_dir))
        tracker.summary(summary)
    return summary


def _progress(done: int, steps: int):
    """Steps done+1..steps under a progress bar (on a terminal only; tqdm disables itself in
    logs and pipes, where the one line per step is the record)."""
    from tqdm.auto import tqdm

    return tqdm(range(done + 1, steps + 1), initial=done, total=steps, desc="train", unit="step",
                disable=None, leave=False)


def _report(run_dir: Path) -> Path:
    from qerl_rollout.report import write_report

    return write_report(run_dir)


def _checkpoint(cfg, run_dir, step, version, trainer, sampler, tracker, config) -> Path:
    from qerl_rollout import checkpoint

    state = checkpoint.RunState(step=step, engine_version=version, sampler=sampler.state_dict(),
                                rng=checkpoint.rng_state(), identity=checkpoint.identity(config),
                                wandb_id=tracker.wandb_id)
    return checkpoint.save(run_dir, state, trainer.save_state, trainer.save_adapter,
                           keep=cfg.run.keep_checkpoints)


def _resume(cfg, run_dir: Path, config: dict, sampler):
    """(state, directory) of the checkpoint a `run.resume=true` run continues from (its
    sampler cursor restored; the caller restores the trainer and the RNGs), or (None, None):
    not resuming, or no complete checkpoint yet (start from step 1)."""
    if not cfg.run.resume:
        return None, None
    import json

    from qerl_rollout import checkpoint

    saved = run_dir / "config.json"
    if saved.is_file():
        checkpoint.check_identity(checkpoint.identity(json.loads(saved.read_text())),
                                  checkpoint.identity(config))
    found = checkpoint.latest(run_dir)
    if found is None:
        print(f"resume: no complete checkpoint in {run_dir}; starting from step 1", file=sys.stderr)
        return None, None
    state, path = found
    checkpoint.check_identity(state.identity, checkpoint.identity(config))
    sampler.load_state_dict(state.sampler)
    print(f"resume: continuing after step {state.step} from {path}", file=sys.stderr)
    return state, path


# ---------------------------------------------------------------------------------------- setup

def _in_ray_job() -> bool:
    """Whether this process is the driver of a `ray job submit` job (Ray's job supervisor puts
    the submission id into the job config it passes to the entrypoint's environment)."""
    return "job_submission_id" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")


def _run_dir(cfg) -> Path:
    name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if _in_ray_job() and not Path(cfg.run.output_dir).is_absolute():
        raise FileNotFoundError(
            f"run.output_dir={cfg.run.output_dir} is relative: in a Ray job it would land in the "
            f"job's working directory ({os.getcwd()}), not where you submitted from; pass an "
            "absolute path on storage the cluster shares, e.g. run.output_dir=$PWD/runs")
    run_dir = Path(cfg.run.output_dir) / name
    if cfg.run.resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run.resume=true: no run directory {run_dir} to continue")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} exists and is not empty; "
                              "set tracking.run_name or run.output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.tracking = replace(cfg.tracking, run_name=name)
    return run_dir


def _memory_plan(cfg):
    """The memory plan of a GPU run (`qerl_rollout.planner`, from the model's config.json or
    its shipped shape), checked before anything starts: a rank over `placement.gpu_gib` is
    refused in one line (`LayoutError`); else its peaks in one line. None for a CPU run
    (`policy.device=cpu`) and for a tiny model, which have no GPU memory to plan."""
    if cfg.policy.device == "cpu" or not (cfg.model.path or cfg.model.shape):
        return None
    from qerl_rollout.layout import LayoutError
    from qerl_rollout.planner import count, model_config, plan

    if cfg.model.path and not (Path(cfg.model.path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path {cfg.model.path} has no config.json")
    counts = count(model_config(cfg.model.path, cfg.model.shape), cfg.policy, cfg.rollout.scheme,
                   cfg.rollout.precision)
    memory = plan(cfg, counts, cfg.placement.gpu_gib)
    if memory.refusal:
        raise LayoutError(f"does not fit: {memory.refusal} (the table: python -m qerl_rollout.plan "
                          f"with this run's arguments)")
    log.info("memory plan on %g GiB GPUs: %s", memory.gpu_gib,
             ", ".join(f"{name} {gib:.1f} GiB" for name, gib in memory.peaks.items()))
    return memory


def _model_dir(cfg, run_dir: Path) -> Path:
    if cfg.model.path:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path {path} has no config.json")
        return path
    from qerl_rollout.tiny import SIZES, build_tiny_model

    return build_tiny_model(cfg.model.tiny_family, run_dir / "model", seed=cfg.run.seed,
                            **SIZES[cfg.model.tiny_size])


def _task(cfg, model_dir: Path):
    """(tokenizer, prompt sampler, reward fn, held-out eval prompts or None) for the task."""
    from transformers import AutoTokenizer

    from qerl_rollout.data.prompts import PromptDataConfig, PromptDataset, PromptSampler
    from qerl_rollout.rewards.registry import get_reward
    from qerl_rollout.rewards.synthetic import get_task

    t = cfg.task
    train_rows = None
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    data_cfg = PromptDataConfig(path=t.path, prompt_field=t.prompt_field, answer_field=t.answer_field,
                                max_prompt_tokens=t.max_prompt_tokens, seed=cfg.run.seed)
    if t.synthetic:
        task = get_task(t.synthetic)
        rows = task.rows(1024, seed=cfg.run.seed)
        train_rows = rows
        if all(r.get("answer") is None for r in rows):   # e.g. `digits`: nothing to check against
            data_cfg = replace(data_cfg, answer_field=None)
        dataset = PromptDataset(rows, tokenizer, data_cfg)
        reward = get_reward(t.reward) if t.reward else task.reward
    elif t.path:
        dataset = PromptDataset.from_file(data_cfg, tokenizer)
        reward = get_reward(t.reward or "math")
    else:
        raise ValueError("set task.synthetic or task.path")
    eval_data = None
    if cfg.eval.every:
        from qerl_rollout.evaluation import held_out_dataset

        eval_data = held_out_dataset(cfg, tokenizer, data_cfg, train_rows)
    sampler = PromptSampler(dataset, cfg.rollout.prompts_per_step, seed=cfg.run.seed)
    return tokenizer, sampler, reward, eval_data


def _policy_config(cfg, model_dir: Path):
    r = cfg.rollout
    return replace(cfg.policy, model_path=str(model_dir), total_steps=cfg.run.steps,
                   seed=cfg.run.seed, temperature=r.temperature, routing_replay=r.routing_replay,
                   target_modules=tuple(cfg.policy.target_modules),
                   target_parameters=tuple(cfg.policy.target_parameters),
                   betas=tuple(cfg.policy.betas))


def _baseline(cfg, placement):
    if placement.baseline is None:
        return None
    from qerl_rollout.rollout.baseline import BF16Baseline

    return BF16Baseline(placement.baseline, push=lambda: placement.trainer.push("baseline"))


def _place(cfg, model_dir: Path, run_dir: Path, routed: bool):
    """The trainer and the engines, in this process or on Ray (`placement.mode`)."""
    r = cfg.rollout
    grpo = replace(cfg.grpo, horizon=cfg.grpo.horizon or r.max_tokens)
    engine = {"seed": cfg.run.seed, "max_model_len": r.max_model_len, "cpu_rmsnorm": r.cpu_rmsnorm,
              "return_routes": routed and (r.routing_replay == "r3" or cfg.run.router_stats_every > 0)}
    if cfg.placement.mode == "local":
        from qerl_rollout.layout import LayoutError
        from qerl_rollout.placement.local import LocalPlacement
        from qerl_rollout.rollout.engine import route_vllm_logs

        if _in_ray_job() and _has_cuda():
            raise LayoutError("placement.mode=local would train on a GPU Ray never gave this job's "
                              "driver; use placement.mode=split or colocated in a Ray job")

        if _has_cuda():   # the engines of one process share the run's utilization (the plan's)
            engine["gpu_memory_utilization"] = r.gpu_memory_utilization / cfg.engines_per_local_gpu
        route_vllm_logs(run_dir / "vllm.log")   # before the engines start: vLLM applies it then
        return LocalPlacement(cfg, model_dir, _policy_config(cfg, model_dir), grpo,
                              with_baseline=cfg.wants_baseline, engine_options=engine)
    from qerl_rollout.placement.ray import RayPlacement

    engine["gpu_memory_utilization"] = r.gpu_memory_utilization   # read by vLLM on GPUs only
    return RayPlacement(cfg, model_dir, run_dir, _policy_config(cfg, model_dir), grpo,
                        with_baseline=cfg.wants_baseline, engine_options=engine)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------ per step

def _rewards(samples, prompts, reward_fn, tokenizer, on_error: str = "zero"):
    """(B,) rewards and their health: `reward/errors` (samples whose reward fn raised: reward 0,
    or the run stops when task.reward_errors=raise) and `reward/non_finite` (NaN/Inf rewards,
    which `group_advantages` leaves out)."""
    import torch

    order = [s.prompt_index for s in samples]
    if order != sorted(order):   # group_advantages needs each prompt's samples contiguous
        raise RuntimeError(f"rollout samples are not prompt-major: {order[:16]}")
    values, errors = [], 0
    for s in samples:
        p = prompts[s.prompt_index]
        try:
            values.append(float(reward_fn(p.prompt, tokenizer.decode(s.token_ids, skip_special_tokens=True),
                                          p.answer)))
        except Exception as e:
            if on_error == "raise":
                raise RuntimeError(f"the reward function failed on prompt {p.index}: "
                                   f"{type(e).__name__}: {e}") from e
            values.append(0.0)
            errors += 1
    rewards = torch.tensor(values)
    return rewards, {"reward/errors": errors,
                     "reward/non_finite": int((~torch.isfinite(rewards)).sum())}


def _step_seed(cfg, step: int) -> int:
    """A step's generate call samples prompt i's k-th response from stream seed + i * n + k
    (`RolloutEngine.generate`), so step seeds are `prompts_per_step * group_size` apart: no
    stream is used twice in a run (a stride of one group gave sample k of step s the stream
    of a sample of step s - 1). Runs with different `run.seed` are 1_000_003 steps' worth of
    streams apart."""
    streams = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    return (cfg.run.seed * 1_000_003 + step) * streams


def _measures(cfg, step: int) -> bool:
    """Whether step `step` measures the quantized rollout against the BF16 baseline."""
    every = cfg.rollout.baseline_every
    return bool(every) and step <= cfg.run.steps and step % every == 0


def _pushed_in_phase(placement, trainer, noise):
    """The push check's full re-push, in the push phase (the check left it serving)."""
    placement.phase("push")
    return trainer.push(noise=noise, full=True, digest=True)


def _push_check(cfg, placement):
    """The push check of this run's rollout engines (`sync.verify`; sync.verify_every=0: never due)."""
    from qerl_rollout.rollout.platform import platform_line
    from qerl_rollout.sync.verify import PushCheck, Tolerance

    s = cfg.sync
    return PushCheck(s.verify_every, Tolerance(s.verify_tol, s.verify_max_tol), s.verify_logits, scheme=cfg.rollout.scheme,
                     mode=placement.rollout.receiver.mode, platform=platform_line(short=True))


def _routes_due(cfg, step: int) -> bool:
    """Whether this step's samples carry the engine's routes: every step under R3, else every
    `run.router_stats_every` steps (the trainer then logs router/* and experts/rollout/*)."""
    every = cfg.run.router_stats_every
    return cfg.rollout.routing_replay == "r3" or (bool(every) and step % every == 0)


def _record_expert_counts(run_dir: Path, step: int, counts: dict | None) -> None:
    """Append a step's (layers, experts) token counts to run_dir/experts.jsonl (the report's
    heatmaps; a resumed run appends its steps again, and the newest line of a step counts)."""
    from qerl_rollout.report import EXPERTS_FILE

    if counts is not None:
        with open(run_dir / EXPERTS_FILE, "a") as f:
            f.write(json.dumps({"step": step, **counts}) + "\n")


def _routes_source(placement) -> str:
    """What the engines' routes are (`rollout.routes.SOURCE`): decode routes from vLLM's own
    capture on GPUs, those of a scoring prefill on CPUs."""
    from qerl_rollout.rollout.routes import SOURCE

    layout = getattr(placement, "layout", None)      # Ray placements; a local one is this process
    return SOURCE["gpu" if (layout.use_gpus if layout is not None else _has_cuda()) else "cpu"]


def _routed(cfg, model_dir: Path) -> bool:
    """Whether the model has routers to compare or replay; R3 on a dense model is refused."""
    from qerl_rollout.quant import DEFAULT_SCHEME
    from qerl_rollout.quant.plan import build_plan_from_checkpoint

    plan = build_plan_from_checkpoint(model_dir, DEFAULT_SCHEME)
    moe = any(d.category == "router" for d in plan.decisions.values())
    if not moe and cfg.rollout.routing_replay != "none":
        raise ValueError(f"rollout.routing_replay={cfg.rollout.routing_replay} needs a MoE model; "
                         f"{model_dir} has no routers")
    return moe


# Policy metrics -> logged names, besides verl's `rollout_corr/*` (logged as they come); the
# IS-weight ones exist only when mismatch.level != none.
_POLICY_METRICS = {
    "loss/policy": "loss", "train/grad_norm": "grad_norm",
    "mismatch/is_weight_mean": "is_weight_mean", "mismatch/is_weight_max": "is_weight_max",
}


def _step_metrics(rewards, metrics, report, samples, rollout_s: float, train_s: float) -> dict:
    tokens = sum(len(s.token_ids) for s in samples)
    return {
        "reward/mean": rewards[rewards.isfinite()].mean().item(),
        "reward/std": rewards[rewards.isfinite()].std().item(),
        **{name: metrics[key] for name, key in _POLICY_METRICS.items() if key in metrics},
        **{key: value for key, value in metrics.items() if key.startswith(("rollout_corr/", "experts/", "router/"))},
        "rollout/seconds": rollout_s, "rollout/tokens_per_s": tokens / max(rollout_s, 1e-9),
        "rollout/response_len": tokens / len(samples), "rollout/version": samples[0].version,
        "train/seconds": train_s, "sync/seconds": report.seconds["total"],
        "sync/mb": report.bytes_sent / 1e6, "sync/wire_ratio": report.wire_ratio,
        "sync/delta_ratio": report.bytes_sent / max(report.bytes_whole, 1),
        "sync/version": report.version,
        **{("sync/changed_code_fraction" if kind == "all" else f"sync/changed_code_fraction/{kind}"): value
           for kind, value in report.changed_code_fraction.items()},
    }


def _eval_metrics(cfg, rollout, baseline, eval_data, reward_fn, tokenizer, stop) -> dict:
    """eval/* of the policy the engine now serves (and of its BF16 twin with eval.bf16, which
    the loop pushed in the push phase before)."""
    from qerl_rollout.evaluation import evaluate

    args = dict(max_tokens=cfg.rollout.max_tokens, stop_token_ids=stop, seed=cfg.run.seed,
                on_error=cfg.task.reward_errors)
    out = {f"eval/{k}": v for k, v in evaluate(rollout, eval_data, reward_fn, tokenizer,
                                                cfg.eval, **args).items()}
    if cfg.eval.bf16:
        if baseline is None:       # the run itself is BF16: the gap is zero by definition
            out["eval/reward_bf16"], out["eval/reward_gap"] = out["eval/reward"], 0.0
            return out
        bf16 = evaluate(baseline.rollout, eval_data, reward_fn, tokenizer, cfg.eval, **args)
        out["eval/reward_bf16"] = bf16["reward"]
        out["eval/reward_gap"] = bf16["reward"] - out["eval/reward"]
    return out


def _print_step(step: int, steps: int, m: dict) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"step {step}/{steps}  reward {m['reward/mean']:.3f}  loss {m['loss/policy']:+.4f}  "
          f"k3_kl {m['rollout_corr/k3_kl']:.1e}  rollout {m['rollout/seconds']:.1f}s  "
          f"train {m['train/seconds']:.1f}s  push v{m['sync/version']} {m['sync/mb']:.2f} MB "
          f"{m['sync/seconds']:.2f}s" + _speedup_text(m) + _eval_text(m))


def _eval_text(m: dict) -> str:
    if "eval/reward" not in m:
        return ""
    gap = f" (bf16 {m['eval/reward_bf16']:.3f})" if "eval/reward_bf16" in m else ""
    return f"  eval {m['eval/reward']:.3f}{gap}"


def _speedup_text(m: dict) -> str:
    if "rollout/speedup_vs_bf16" not in m:
        return ""
    kl = f", kl {m['quant/kl_vs_bf16']:.1e}" if "quant/kl_vs_bf16" in m else ""
    return f"  vs bf16 {m['rollout/speedup_vs_bf16']:.2f}x{kl}"


def _summary(run_dir: Path) -> dict:
    from qerl_rollout.tracking import read_metrics

    rows = read_metrics(run_dir)
    rewards = [r["reward/mean"] for r in rows if r.get("reward/mean") is not None]  # NaN -> null
    window = max(1, min(5, len(rewards)))
    summary = {"steps": len(rows), "reward_first5": sum(rewards[:window]) / window,
               "reward_last5": sum(rewards[-window:]) / window, "run_dir": str(run_dir)}
    evals = [r for r in rows if r.get("eval/reward") is not None]
    if evals:   # the last evaluation: the final policy's
        summary.update({k: v for k, v in evals[-1].items() if k.startswith("eval/")})
    for key in ("rollout/speedup_vs_bf16", "quant/kl_vs_bf16"):   # medians of the measured steps
        values = sorted(r[key] for r in rows if r.get(key) is not None)
        if values:
            summary[key] = values[len(values) // 2]
    return summary


# ------------------------------------------------------------------------------------- command

class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when a record is emitted (not when it was
    made: a caller, or pytest, may swap it between runs in one process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _console_logging() -> None:
    """This package's INFO lines (an engine's start, the placement, the trainer workers) and
    any logger's warnings on stderr, once per process; vLLM's go to the run's vllm.log
    (`route_vllm_logs`). The handler sits on the root logger, so records still propagate
    (pytest's caplog sees them) and no library's `logging.info` installs a second one. The
    deprecation vLLM's Triton dispatcher trips at import (`torch.distributed.reduce_op`) is
    not the user's to act on and is not shown."""
    import warnings

    warnings.filterwarnings("ignore", message="`torch.distributed.reduce_op` is deprecated",
                            category=FutureWarning)
    root = logging.getLogger()
    if any(getattr(h, "qerl_console", False) for h in root.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda r: r.name.startswith("qerl_rollout") or r.levelno >= logging.WARNING)
    handler.qerl_console = True
    root.addHandler(handler)
    logging.getLogger("qerl_rollout").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    from qerl_rollout.config import load_config

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if not any(a.startswith("config=") for a in argv):
        argv = ["config=grpo_tiny_cpu", *argv]
    try:
        cfg = load_config(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from qerl_rollout.layout import LayoutError, WorkerDiedError
    from qerl_rollout.rollout.platform import platform_line
    from qerl_rollout.sync.verify import StalePushError

    print(platform_line(), file=sys.stderr, flush=True)
    _console_logging()
    try:
        summary = run(cfg)
    except (FileNotFoundError, FileExistsError, LayoutError) as e:   # run dir taken, model.path wrong, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StalePushError as e:
        print(f"error: {e}; nothing was written after the failed check, so the checkpoints in "
              f"{cfg.run.output_dir}/{cfg.tracking.run_name} hold only weights from before it", file=sys.stderr)
        return 1
    except WorkerDiedError as e:
        print(f"error: {e}; the run's checkpoints are in {cfg.run.output_dir}/{cfg.tracking.run_name}",
              file=sys.stderr)
        return 1
    except ValueError as e:
        if not str(e).startswith("cannot resume"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130   # the run checkpointed its last completed step and said where
    print(f"reward {summary['reward_first5']:.3f} -> {summary['reward_last5']:.3f} "
          f"(mean of the first / last 5 steps) in {summary['steps']} steps; run in {summary['run_dir']}")
    if "eval/reward" in summary:
        print(f"held-out eval reward {summary['eval/reward']:.3f} (final policy)")
    print(f"report: {summary['report']}")
    if "rollout/speedup_vs_bf16" in summary:
        print(f"rollout {summary['rollout/speedup_vs_bf16']:.2f}x the tokens/s of BF16 (median of the "
              f"measured steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
