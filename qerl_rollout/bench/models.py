"""The benchmark checkpoints: synthetic Qwen3-MoE models built locally once and cached.

`model_dir(name, root)` returns the directory of MODELS[name], building it atomically on first
use (a temp dir renamed into place, so concurrent or interrupted builds never leave half a
model). Weights are random N(0, 0.02) with a fixed seed: the benchmarks time kernels and
moves, which do not depend on what the weights mean. `environment()` is what every result
file records about the machine it ran on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qerl_rollout.tiny import SIZES

MODELS = SIZES
DEFAULT_MODELS_DIR = Path.home() / ".cache" / "qerl_rollout" / "bench_models"


def model_dir(name: str, root: Path = DEFAULT_MODELS_DIR) -> Path:
    """The cached checkpoint of MODELS[name], built (atomically) on first use."""
    from qerl_rollout.tiny import build_tiny_model

    overrides = MODELS[name]
    key = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:12]
    out = root / f"qwen3_moe-{name}-{key}"
    if (out / "qerl_tiny.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{out.name}-"))
    t0 = time.perf_counter()
    build_tiny_model("qwen3_moe", tmp, seed=0, **overrides)
    try:
        tmp.rename(out)
    except OSError:                 # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built {out} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def parameter_count(path: Path) -> int:
    """Parameters stored in a checkpoint, read from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += int(torch.tensor(shape).prod()) if shape else 1
    return total


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def vllm_env_defaults(kv_cache_gib: int = 1) -> None:
    """What every engine benchmark sets before vLLM starts (an explicit environment wins)."""
    from qerl_rollout.rollout.engine import set_engine_env

    set_engine_env(kv_cache_gib)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_result(path: Path, result: dict) -> None:
    """The benchmark's JSON, parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def environment() -> dict:
    return {"machine": platform.machine(), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
            "torch": torch.__version__, "python": platform.python_version()}
