"""Run checkpoints: everything a GRPO run needs to continue after a crash, written atomically.

Layout: `run_dir/checkpoints/step-000010/` holds `adapter/` (the LoRA adapter in peft's format,
for users), `trainer.pt` (LoRA tensors, optimizer and LR-scheduler state, the prompt sampler's
cursor, RNG states) and `meta.json` (step, the engine's weight version, the run's identity and
its wandb id). `save` writes all of it into a hidden temporary directory beside the final one,
fsyncs every file and the directory, renames it into place and fsyncs the parent: a rename is
atomic, so a `step-*` directory is either whole or absent, and a process killed mid-write leaves
only a `.step-*.partial-*` directory, which the next `save` removes. Then all but the newest
`keep` checkpoints are deleted. `latest` returns the newest checkpoint that loads; one whose
files are missing, truncated or unreadable is skipped with a warning that names it.

The identity (`identity(config)`) is what a resume must not change: the model, the rollout
scheme and the task (else it is another run), the placement with its worker, engine and TP
counts (the sampling and the optimizer state's layout follow them), and the schedule
(`run.steps`, `policy.warmup_steps`: the LR and AQN schedules are shaped by them);
`check_identity` names the first field that differs (`train` checks before anything starts).
A field an older checkpoint did not record is not compared. Left out: the rollout engine's
weights (they are the trainer's, pushed again on resume) and the vLLM state (a fresh engine).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


@dataclass
class RunState:
    step: int                 # the last completed step
    engine_version: int       # the weight version the engine served after that step's push
    trainer: dict             # Policy.state_dict()
    sampler: dict             # PromptSampler.state_dict()
    rng: dict
    identity: dict
    wandb_id: str | None = None


IDENTITY_KEYS = ("model", "task", "rollout.scheme", "placement.mode", "trainer.num_workers",
                 "rollout.num_engines", "rollout.tensor_parallel_size", "run.steps", "policy.warmup_steps")


def identity(config: dict) -> dict:
    """The parts of a run's (resolved, nested) config a resume must keep (module docstring)."""
    out = {}
    for key in IDENTITY_KEYS:
        value = config
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def check_identity(saved: dict, current: dict) -> None:
    for key in sorted(saved.keys() & current.keys(), key=IDENTITY_KEYS.index):
        if saved[key] != current[key]:
            raise ValueError(f"cannot resume: {key} differs from the checkpointed run "
                             f"({saved[key]!r} there, {current[key]!r} now)")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save(run_dir: Path, state: RunState, adapter_writer, keep: int = 2) -> Path:
    """Write `state` (and the adapter, through `adapter_writer(path)`) as step-NNNNNN."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{_PREFIX}*.partial-*"):   # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{_PREFIX}{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=root))
    try:
        adapter_writer(tmp / "adapter")
        torch.save({"trainer": state.trainer, "sampler": state.sampler, "rng": state.rng},
                   tmp / "trainer.pt")
        meta = {"step": state.step, "engine_version": state.engine_version,
                "identity": state.identity, "wandb_id": state.wandb_id}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        if final.exists():                               # a rerun of the same step
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> tuple[RunState, Path] | None:
    """The newest checkpoint that loads, or None; unreadable ones are skipped with a warning."""
    for path in reversed(_complete(Path(run_dir) / CHECKPOINTS)):
        try:
            return load(path), path
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, named
            log.warning("skipping checkpoint %s: it does not load (%s: %s)", path, type(e).__name__, e)
    return None


def load(path: Path) -> RunState:
    meta = json.loads((path / "meta.json").read_text())
    if not (path / "adapter").is_dir():
        raise FileNotFoundError(f"{path / 'adapter'} is missing")
    data = torch.load(path / "trainer.pt", weights_only=False)
    return RunState(step=meta["step"], engine_version=meta["engine_version"],
                    trainer=data["trainer"], sampler=data["sampler"], rng=data["rng"],
                    identity=meta["identity"], wandb_id=meta.get("wandb_id"))


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
                  and p.name[len(_PREFIX):].isdigit())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
