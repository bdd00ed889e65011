"""Write a compressed-tensors checkpoint of a BF16/FP16 safetensors model.

How it works. `export_checkpoint` checks everything it can before reading any weight (the
directory, config.json, the safetensors headers: every tensor the plan quantizes must be BF16 or
FP16, and the checkpoint's tensor names must be exactly the plan's), then streams the weights one
work unit at a time: a unit is one tensor, or a fused group (q/k/v, an expert's gate/up) whose
members share one NVFP4 global scale (the max amax of the group). Each quantized weight is
replaced by its compressed tensors (`weight`/`weight_packed`, `weight_scale`,
`weight_global_scale`), exempt tensors are copied unchanged. Output is written in shards of at
most `max_shard_bytes` (so memory holds one shard, never a second state dict) into a temporary
directory beside `out_dir`, together with config.json (plus `quantization_config`) and the
tokenizer/generation files; the temporary directory is renamed to `out_dir` only at the end, so
a failure (NaN/Inf in a weight, a bad dtype, ...) leaves nothing behind.

The `quantization_config` has one config group, the scheme's own (`QuantScheme.config_group`:
what compressed-tensors' FP8_BLOCK, FP8_DYNAMIC or NVFP4A16 preset serializes to), targeting
"Linear" (plus one group per other scheme of `rollout.quant_overrides`, targeting its modules
by name: `quantization_config`), and an `ignore` list of anchored `re:`
patterns for every exempt linear-like module (routers, shared-expert gates, lm_head, embeddings),
because vLLM's "Linear" target also matches router layers.

`cached_export` is the driver's form: one export per (checkpoint files, scheme, EXPORT_FORMAT,
plan) in a cache directory, made under a file lock, so that N engines starting together on a
cold cache find one finished export (the first caller writes it, the others wait for the lock
and reuse it); without the lock every engine after the first died at the final rename.

Left out: sparsity and transform configs, KV-cache quantization, activation calibration (the
FP8 schemes use dynamic activation scales), checkpoints in .bin format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from qerl_rollout.quant import SCHEMES, get_scheme, quantize
from qerl_rollout.quant.plan import Precision, QuantPlan, build_plan_from_checkpoint

log = logging.getLogger(__name__)

# Bump when the bytes an export writes for the same plan change (names, dtypes, scales,
# config.json): the cache key carries it instead of the package version.
EXPORT_FORMAT = 1

QUANTIZABLE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}
INDEX_NAME = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ExportError(ValueError):
    """Bad input to the export; nothing has been written when it is raised."""


# ================================ entry point ==============================================


def export_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    scheme: str,
    overwrite: bool = False,
    *,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = True,
    precision: Precision | None = None,
) -> QuantPlan:
    """Quantize the checkpoint in `model_dir` with `scheme` into `out_dir` (the layers
    `precision` names; the rest stays BF16); returns the plan."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_scheme(scheme)
    source = CheckpointSource.open(model_dir)
    _check_out_dir(out_dir, overwrite)
    plan = build_plan_from_checkpoint(model_dir, scheme, precision)
    source.check_against(plan)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _write_weights(source, plan, tmp, max_shard_bytes, progress)
        _write_config(model_dir, tmp, quantization_config(plan))
        _copy_side_files(model_dir, tmp)
        _commit(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan


def cached_export(model_dir: str | Path, scheme: str, cache_root: str | Path | None = None,
                  progress: bool = True, precision: Precision | None = None) -> Path:
    """The export of `model_dir` in `scheme` under `cache_root` (default
    `$QERL_EXPORT_CACHE` or `~/.cache/qerl_rollout/exports`), made now if it is not there.

    Safe to call from several processes at once: a file lock beside the export lets one write
    it; the others wait for the lock, then find it complete.
    """
    from filelock import FileLock

    model_dir = Path(model_dir)
    _check_scheme(scheme)
    root = Path(cache_root or os.environ.get("QERL_EXPORT_CACHE")
                or Path.home() / ".cache" / "qerl_rollout" / "exports")
    root.mkdir(parents=True, exist_ok=True)
    out_dir = root / f"{model_dir.name}-{scheme}-{export_key(model_dir, scheme, precision)}"
    lock = FileLock(str(root / f".{out_dir.name}.lock"))
    try:
        lock.acquire(blocking=False)
    except TimeoutError:
        log.info("waiting for another process's export %s", out_dir)
        lock.acquire()
    try:
        if not (out_dir / "config.json").is_file():
            export_checkpoint(model_dir, out_dir, scheme, progress=progress, precision=precision)
    finally:
        lock.release()
    return out_dir


def export_key(model_dir: Path, scheme: str, precision: Precision | None = None) -> str:
    """Changes with the checkpoint's files (path, sizes, mtimes), the scheme, EXPORT_FORMAT and
    the plan (what is quantized, so the precision too, and the compressed-tensors config it writes)."""
    model_dir = Path(model_dir).resolve()
    plan = build_plan_from_checkpoint(model_dir, scheme, precision)
    parts = [str(model_dir), scheme, f"format {EXPORT_FORMAT}",
             json.dumps(quantization_config(plan), sort_keys=True)]
    parts += [f"{d.name}:{d.scheme}:{d.shape}" for d in sorted(plan.decisions.values(), key=lambda d: d.name)]
    for f in _safetensors_files(model_dir) + [model_dir / "config.json"]:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ExportError(f"unknown scheme {scheme!r}; choose from {sorted(SCHEMES)}")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise ExportError(f"output directory {out_dir} exists; pass overwrite=True (--overwrite)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a directory")


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temp dir into place; an old `out_dir` is removed only after that."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    assert overwrite
    old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name[-8:]}")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ================================ reading ==================================================


@dataclass
class CheckpointSource:
    """Lazy view of a safetensors checkpoint: tensor name -> file, header dtypes, open handles."""

    model_dir: Path
    files: dict[str, Path]  # tensor name -> file
    dtypes: dict[str, str]  # tensor name -> safetensors dtype string ("BF16", ...)
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, model_dir: Path) -> CheckpointSource:
        if not model_dir.is_dir():
            raise ExportError(f"model directory {model_dir} does not exist")
        if not (model_dir / "config.json").is_file():
            raise ExportError(f"{model_dir} has no config.json")
        files, dtypes = {}, {}
        for path in _safetensors_files(model_dir):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    files[key] = path
                    dtypes[key] = f.get_slice(key).get_dtype()
        return cls(model_dir, files, dtypes)

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), "pt")
        return self._handles[path].get_tensor(name)

    def check_against(self, plan: QuantPlan) -> None:
        """Names match the plan exactly; every tensor the plan quantizes is BF16/FP16."""
        expected, found = set(plan.checkpoint_names()), set(self.files)
        if found - expected:
            raise ExportError(
                f"tensors not in the {plan.model_type} plan: {sorted(found - expected)[:5]}"
            )
        if expected - found:
            raise ExportError(f"checkpoint lacks tensors: {sorted(expected - found)[:5]}")
        for name in self.files:
            if plan.for_checkpoint(name).quantized and self.dtypes[name] not in QUANTIZABLE_DTYPES:
                raise ExportError(
                    f"{name} is {self.dtypes[name]}; quantization needs BF16 or FP16 weights"
                )


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [model_dir / s for s in shards]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ExportError(f"{INDEX_NAME} names missing shards: {missing}")
        return paths
    paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise ExportError(f"no .safetensors files in {model_dir}")
    return paths


# ================================ quantizing ===============================================


def work_units(plan: QuantPlan, names: list[str]) -> Iterator[tuple[str, ...]]:
    """Checkpoint names in file order, fused groups of quantized tensors kept together."""
    done: set[str] = set()
    for name in names:
        if name in done:
            continue
        unit = plan.group_of(name) if plan.for_checkpoint(name).quantized else (name,)
        done.update(unit)
        yield unit


def quantize_unit(
    plan: QuantPlan, tensors: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Compressed (or copied) output tensors of one work unit, under checkpoint names."""
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ExportError(f"{name} contains NaN or Inf")
    quantized = {n: t for n, t in tensors.items() if plan.for_checkpoint(n).quantized}
    global_amax = plan.group_amax({n: t.abs().amax() for n, t in quantized.items()})
    for name, t in tensors.items():
        if name not in quantized:
            yield name, t
            continue
        module = name.removesuffix(".weight")
        scheme = plan.for_checkpoint(name).scheme
        for suffix, part in quantize(t, scheme, global_amax=global_amax[name]).compressed().items():
            yield f"{module}.{suffix}", part


def _write_weights(
    source: CheckpointSource, plan: QuantPlan, out: Path, max_shard_bytes: int, progress: bool
) -> None:
    writer = ShardWriter(out, max_shard_bytes)
    units = list(work_units(plan, source.names()))
    for unit in tqdm(units, desc=f"quantize {plan.scheme}", unit="group", disable=not progress):
        tensors = {n: source.get(n) for n in unit}
        for name, t in quantize_unit(plan, tensors):
            writer.add(name, t)
    writer.close()


# ================================ writing ==================================================


@dataclass
class ShardWriter:
    """Collects tensors into shards of at most `max_bytes`, then names them like HF does."""

    out_dir: Path
    max_bytes: int
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending_bytes: int = 0
    _shards: list[tuple[Path, list[str]]] = field(default_factory=list)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self._total_bytes()}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def _total_bytes(self) -> int:
        return sum(
            (self.out_dir / p).stat().st_size for p in self.out_dir.glob("model-*.safetensors")
        )


def _write_config(model_dir: Path, out: Path, quant_config: dict) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _copy_side_files(model_dir: Path, out: Path) -> None:
    """Tokenizer, chat template, generation config and other small non-weight files."""
    for path in model_dir.iterdir():
        if (
            not path.is_file()
            or path.name.startswith(".")
            or path.name in ("config.json", INDEX_NAME)
            or path.name.endswith(_WEIGHT_SUFFIXES)
        ):
            continue
        shutil.copy2(path, out / path.name)


# ================================ quantization_config ======================================


def quantization_config(plan: QuantPlan) -> dict:
    """The config.json `quantization_config` for `plan` (compressed-tensors format).

    One group per scheme. The plan's own scheme targets "Linear"; each other scheme
    (`quant_overrides`) targets its modules by anchored `re:` patterns, which vLLM matches
    before class names (`find_matched_target`), and each group names its own format (the
    top-level one is then compressed-tensors' "mixed-precision")."""
    schemes = plan.schemes() or [plan.scheme]
    groups = {"group_0": get_scheme(schemes[0]).config_group(["Linear"])}
    for i, scheme in enumerate(schemes[1:], 1):
        groups[f"group_{i}"] = get_scheme(scheme).config_group(plan.module_patterns(scheme))
    formats = {get_scheme(s).format for s in schemes}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": plan.ignore_patterns(),
        "kv_cache_scheme": None,
    }
