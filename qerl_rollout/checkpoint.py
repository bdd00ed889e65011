"""Run checkpoints: everything a GRPO run needs to continue after a crash, written atomically.

Layout: `run_dir/checkpoints/step-000010/` holds
- `trainer/`: the trainable state (LoRA tensors, AdamW moments, LR schedule, step) as a
  torch.distributed.checkpoint directory that the trainer ranks write themselves, each its
  own shards (`__<rank>_0.distcp`) beside rank 0's `.metadata` index (`Policy.save_state`):
  nothing passes through the driver, the frozen base is never in it, and a resume with
  another number of ranks reshards it (`Policy.load_state`);
- `adapter/`: the LoRA adapter in peft's format, for users;
- `driver.pt`: the prompt sampler's cursor and the driver's RNG states;
- `meta.json`: step, the engine's weight version, the run's identity and its wandb id.

`save` has everything written into a hidden temporary directory beside the final one, checks
that every shard file the trainer's index names is there and whole (ranks on several nodes
need one filesystem for the run directory; a rank's file that did not arrive is named),
fsyncs every file and the directory, renames it into place and fsyncs the parent: a rename is
atomic, so a `step-*` directory is either whole or absent, and a process killed mid-write leaves
only a `.step-*.partial-*` directory, which the next `save` removes. Then all but the newest
`keep` checkpoints are deleted. `latest` returns the newest checkpoint that loads; one whose
files are missing, truncated or unreadable is skipped with a warning that names it. A
checkpoint of the older single-file format (`trainer.pt`) is refused in one line, not skipped.

The identity (`identity(config)`) is what a resume must not change: the model, the rollout
scheme and the task (else it is another run), the placement with its engine and TP counts
(the sampling follows them), and the schedule
(`run.steps`, `policy.warmup_steps`: the LR and AQN schedules are shaped by them);
`check_identity` names the first field that differs (`train` checks before anything starts).
A field an older checkpoint did not record is not compared. The trainer's worker count may
change: its state reshards. Left out: the rollout engine's
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
TRAINER = "trainer"            # the trainer ranks' torch.distributed.checkpoint directory
_PREFIX = "step-"


class OldFormatError(ValueError):
    """A checkpoint of the single-file format (`trainer.pt`), which this version cannot resume."""


@dataclass
class RunState:
    step: int                 # the last completed step
    engine_version: int       # the weight version the engine served after that step's push
    sampler: dict             # PromptSampler.state_dict()
    rng: dict
    identity: dict
    wandb_id: str | None = None


IDENTITY_KEYS = ("model", "task", "rollout.scheme", "rollout.quant_targets", "rollout.bf16_layers",
                 "rollout.quant_overrides", "placement.mode", "rollout.num_engines",
                 "rollout.tensor_parallel_size", "run.steps", "policy.warmup_steps")


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


def save(run_dir: Path, state: RunState, write_trainer, write_adapter, keep: int = 2) -> Path:
    """Write `state` as step-NNNNNN, with the trainer's state (`write_trainer(path)`, the
    trainer ranks' `Policy.save_state`) and the adapter (`write_adapter(path)`) inside."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{_PREFIX}*.partial-*"):   # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{_PREFIX}{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=root))
    try:
        write_trainer(tmp / TRAINER)
        check_trainer_files(tmp / TRAINER)
        write_adapter(tmp / "adapter")
        torch.save({"sampler": state.sampler, "rng": state.rng}, tmp / "driver.pt")
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
    """The newest checkpoint that loads, or None; unreadable ones are skipped with a warning.
    Its trainer state is `path / TRAINER`, for the trainer's `load_state`."""
    for path in reversed(_complete(Path(run_dir) / CHECKPOINTS)):
        try:
            return load(path), path
        except OldFormatError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, named
            log.warning("skipping checkpoint %s: it does not load (%s: %s)", path, type(e).__name__, e)
    return None


def load(path: Path) -> RunState:
    """The driver's part of checkpoint `path`, once every file of it is checked to be there."""
    if (path / "trainer.pt").is_file() and not (path / TRAINER).exists():
        raise OldFormatError(f"cannot resume: {path} was written by an older qerl_rollout "
                             "(one trainer.pt); start a new run (its adapter/ is a peft adapter)")
    meta = json.loads((path / "meta.json").read_text())
    if not (path / "adapter").is_dir():
        raise FileNotFoundError(f"{path / 'adapter'} is missing")
    check_trainer_files(path / TRAINER)
    data = torch.load(path / "driver.pt", weights_only=False)
    return RunState(step=meta["step"], engine_version=meta["engine_version"], sampler=data["sampler"],
                    rng=data["rng"], identity=meta["identity"], wandb_id=meta.get("wandb_id"))


def check_trainer_files(path: Path) -> None:
    """Every shard file the trainer state's `.metadata` names exists and holds every byte range
    it indexes (a rank that wrote elsewhere, or a file cut short, is named)."""
    from torch.distributed.checkpoint import FileSystemReader

    ends: dict[str, int] = {}
    for info in FileSystemReader(str(path)).read_metadata().storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = Path(path) / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < end:
            raise FileNotFoundError(
                f"{file} is {'missing' if size is None else f'cut short ({size} of {end} bytes)'}: "
                "a trainer rank's shard did not arrive whole (ranks on several nodes need the run "
                "directory on a filesystem they all share)")


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
