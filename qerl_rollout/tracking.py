"""The run's record: a local metrics file that is always written, and wandb beside it.

How it works. `Tracker(cfg, run_dir, config)` creates `run_dir`, writes the resolved config
to `run_dir/config.json` and starts a wandb run with `mode=cfg.wandb_mode` and
`dir=run_dir` (so wandb's files land in `run_dir/wandb/`). Each `log(step, metrics)` appends
one JSON line `{"step": step, **metrics}` to `run_dir/metrics.jsonl` and flushes it, so a
process that dies loses nothing already logged (a machine that loses power may still lose
the OS buffer: there is no fsync). Every `log_every`-th step also goes to wandb.
`summary(values)` sets wandb's run summary and rewrites `run_dir/summary.json` (merged
over earlier calls). `finish()` closes both; it is idempotent, and the tracker is a context
manager that finishes even when the body raises. `read_metrics(run_dir)` parses the file
back and names the line number of a corrupt line.

The local file is the source of truth; wandb is best effort. If wandb fails to start (not
installed, no credentials in online mode, a bad settings dir) the tracker warns once and
keeps writing the file. It never prompts: online mode logs in with `prompt=False` and
falls back to file-only without a key. Offline mode never touches the network; upload a
run later with `wandb sync run_dir/wandb/offline-run-*`. Offline wandb 0.31 keeps the whole
run (history, summary, config) in the binary `run-<id>.wandb` file only (no
`files/wandb-summary.json`), and its core process writes that file a few milliseconds after
`run.finish()` returns; it completes even if this process exits at once.

Non-finite values (NaN, inf) are stored as `null` in the file (strict JSON) and left out of
wandb; the first time a key goes non-finite a warning names it and the step.

Metric names (`group/name`, so wandb groups the panels):
    reward/mean, reward/std          GRPO reward over the step's samples
    loss/policy                      the GRPO policy loss
    rollout_corr/*                   verl's rollout-vs-trainer diagnostics, computed verl's way
                                     (`rl.mismatch.rollout_corr_metrics`): kl, k3_kl (KL(pi_rollout
                                     || pi_old) per token, k1 and k3), chi2_token, chi2_seq, *_ppl,
                                     log_ppl_diff, ppl_ratio, rollout_is_mean (before truncation),
                                     rollout_is_eff_sample_size, rollout_is_ratio_fraction_high/low,
                                     rollout_rs_masked_fraction (rejected tokens)
    mismatch/is_weight_mean, _max    mean / max of the truncated IS weights the loss uses
    step/seconds                     wall time of the step: rollout, train, push, and any baseline,
                                     push check or eval it ran (checkpoints not included)
    rollout/seconds                  wall time of generation
    rollout/tokens_per_s             generated tokens per second (the speed that matters)
    rollout/response_len             mean response length in tokens
    train/seconds                    wall time of logprobs + GRPO update
    sync/seconds, sync/mb            wall time and payload of the weight push
    sync/wire_ratio                  bytes on the wire / bytes of the BF16 weights
    sync/delta_ratio                 bytes on the wire / bytes of the same tensors whole (below 1
                                     with `sync.delta`: only changed blocks travel)
    sync/changed_code_fraction       64-byte blocks of quantized codes the push changed over those
                                     sent before (`sync.code_delta`), and per kind (`.../expert`); 0
                                     for 3 pushes in a row warns: the rollout policy is frozen
    experts/trainer/load_cv          the trainer's expert load in its training forward (MoE only,
    experts/trainer/max_over_mean    `rl.routing`): std / mean of the tokens per expert, the
    experts/trainer/dead             busiest expert over the mean, experts with no token; mean
                                     over layers (dead: summed), and per layer (`.../layer<i>`)
    experts/rollout/*                the same of the rollout's routes for the same tokens
    router/topk_agreement            mean fraction of the k experts the trainer's routers and
                                     the rollout engine's chose alike for the step's tokens
    router/flip_rate                 fraction of (token, layer) whose k experts differ; both
                                     overall and per layer, every run.router_stats_every steps
                                     (`rl.routing`; the routes' source is the summary's
                                     routing/source: "prefill" on CPU engines, "decode" on GPUs)
    rollout/speedup_vs_bf16          quantized tokens/s over a BF16 engine's on the same batch
    quant/kl_vs_bf16                 KL(pi_quant || pi_bf16) on the quantized samples; both
                                     every rollout.baseline_every steps (`rollout.baseline`)

A resumed run (`resume_step`, `wandb_id`) truncates the file back to the checkpoint's step and
resumes the same wandb run id. What it leaves out: plots (wandb draws them; `read_metrics`
feeds local ones), artifacts and checkpoints (`qerl_rollout.checkpoint`), and multi-process
logging (only the controller process owns a Tracker).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrackingConfig:
    project: str = "qerl_rollout"
    run_name: str | None = None    # default: f"{config['name']}-{timestamp}"
    wandb_mode: str = "offline"    # "offline" | "online" | "disabled"
    log_every: int = 1             # send every Nth step to wandb; the local file gets all
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(
                f"tracking.wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")
        if self.log_every < 1:
            raise ValueError(f"tracking.log_every must be >= 1, got {self.log_every}")


def default_run_name(config: dict) -> str:
    return f"{config.get('name', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"


class Tracker:
    """One run's record: `run_dir/{config.json, metrics.jsonl, summary.json}` plus wandb."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, config: dict, *,
                 resume_step: int | None = None, wandb_id: str | None = None):
        """`resume_step`: continue a run after that step: metrics.jsonl keeps only the rows up
        to it (rewritten atomically) and wandb resumes the run `wandb_id`."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.run_dir / "config.json", config)
        self.name = cfg.run_name or default_run_name(config)
        if resume_step is not None:
            truncate_metrics(self.run_dir, resume_step)
        # Open for the run's lifetime; finish() closes it.
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._summary: dict = {}
        self._warned_keys: set[str] = set()
        self._finished = False
        self.run = _start_wandb(cfg, self.run_dir, self.name, config, wandb_id)

    @property
    def wandb_id(self) -> str | None:
        return None if self.run is None else self.run.id

    # -- logging ---------------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._finished:
            raise RuntimeError("Tracker.log called after finish()")
        if "step" in metrics:
            raise ValueError("'step' is the log() argument, not a metric key")
        values = {k: _as_number(k, v) for k, v in metrics.items()}
        finite = self._drop_non_finite(step, values)
        record = {"step": int(step), **{k: values[k] if k in finite else None for k in values}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self.run is not None and step % self.cfg.log_every == 0:
            self.run.log(finite, step=int(step))

    def summary(self, values: dict) -> None:
        """Final or headline values (numbers or strings); non-finite numbers become null."""
        values = {k: v if v is None or isinstance(v, (str, bool)) else _as_number(k, v)
                  for k, v in values.items()}
        kept = {k: v for k, v in values.items() if not _is_non_finite(v)}
        self._summary.update({k: kept.get(k) for k in values})
        _write_json(self.run_dir / "summary.json", self._summary)
        if self.run is not None:
            self.run.summary.update(kept)

    def _drop_non_finite(self, step: int, values: dict) -> dict:
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        for key in values.keys() - finite.keys() - self._warned_keys:
            log.warning("metric %r is non-finite (%s) at step %d: stored as null, not sent to"
                        " wandb (later non-finite values of this key are not reported)",
                        key, values[key], step)
            self._warned_keys.add(key)
        return finite

    # -- lifecycle -------------------------------------------------------------------------

    def finish(self, exit_code: int = 0) -> None:
        """Close the metrics file and the wandb run (a non-zero code marks it failed)."""
        if self._finished:
            return
        self._finished = True
        self._file.close()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else 0)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Parse `run_dir/metrics.jsonl` back into records; a corrupt line is an error naming it."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg}): "
                                 f"{line[:80]!r}") from None
    return records


# -- helpers ---------------------------------------------------------------------------------


def _as_number(key: str, value) -> int | float:
    """Ints stay ints; floats, numpy scalars and 0-d tensors become Python floats."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from None


def _is_non_finite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _write_json(path: Path, data: dict) -> None:
    """Write atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep the metrics rows with step <= last_step (a torn last line is dropped too)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue   # the line a killed process was writing
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _start_wandb(cfg: TrackingConfig, run_dir: Path, name: str, config: dict,
                 wandb_id: str | None = None):
    """A wandb run (resuming `wandb_id` when given), or None (with one warning) when wandb
    cannot start."""
    try:
        import wandb

        if cfg.wandb_mode == "online" and not wandb.login(prompt=False, verify=False):
            raise RuntimeError("no wandb API key (set WANDB_API_KEY or run `wandb login`)")
        resume = {"id": wandb_id, "resume": "allow"} if wandb_id else {}
        # vLLM imports openai, which makes wandb suggest Weave (three lines); the user's own
        # setting wins.
        os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
        run = wandb.init(project=cfg.project, name=name, mode=cfg.wandb_mode, dir=str(run_dir),
                         config=config, tags=list(cfg.tags), reinit="create_new",
                         settings=wandb.Settings(silent=True), **resume)
        # One line instead of wandb's seven (its version, offline hints, product tips).
        log.info("wandb %s run %s: %s", cfg.wandb_mode, run.id,
                 run.url if cfg.wandb_mode == "online" else run.dir)
        return run
    except Exception as e:  # noqa: BLE001 - the local file is the record; wandb is best effort
        log.warning("wandb did not start (%s: %s); metrics go to %s only",
                    type(e).__name__, e, run_dir / METRICS_FILE)
        return None
