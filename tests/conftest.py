"""Shared fixtures: tiny random-weight models built locally once per test session.

`tiny_model("qwen3_moe")` returns the directory of a BF16 safetensors checkpoint with its
tokenizer (see `qerl_rollout.tiny`). Each (family, seed) is built once per session and shared;
tests must treat the directory as read-only (copy it before changing files).
"""

from __future__ import annotations

import os

# Set before any test imports vLLM: in-process engine, small KV cache, quiet logs.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from qerl_rollout.tiny import FAMILIES, build_tiny_model

MOE_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"]


# The suite runs on 2 pytest-xdist workers (`-n 2 --dist loadgroup`, pyproject's addopts). Each
# test file runs whole in one worker, in its written order, with its module fixtures (several
# files close their engines in their last test). The files that start local Ray clusters share
# one worker, and go first: `ray.init()` without an address finds another process's running
# cluster through /tmp/ray/ray_current_cluster and joins it or refuses `num_cpus`.
RAY_FILES = ("tests/workers/", "tests/test_resume.py", "tests/test_train.py")
# Ray starts its workers at nice 15: beside the other pytest worker's engines (nice 0) the Ray
# tests' actors got the CPU last, and that worker was the suite's long pole (the split resume
# test 384 s under xdist, ~100-127 s alone). At 0 both workers share the cores evenly.
os.environ.setdefault("RAY_worker_niceness", "0")
# The environment the suite started with, before any engine ran in a worker: vLLM sets
# LD_PRELOAD, LOCAL_WORLD_SIZE and others in the process that starts one (`launch_env`).
SUITE_ENV = dict(os.environ)


@pytest.hookimpl(tryfirst=True)     # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    def group(item) -> str:
        path = item.nodeid.split("::")[0]
        return "ray" if path.startswith(RAY_FILES) else path

    items.sort(key=lambda item: group(item) != "ray")     # stable: file order kept within each
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))


def pytest_report_header(config):
    """The first line of a run names the machine: the suite must pass on each CPU kind."""
    from qerl_rollout.rollout.platform import platform_line

    return [platform_line()]


@pytest.fixture(scope="session", autouse=True)
def _export_cache(tmp_path_factory):
    """Kernel-mode exports of the suite go to a session directory, not ~/.cache."""
    os.environ.setdefault("QERL_EXPORT_CACHE", str(tmp_path_factory.mktemp("exports")))


@pytest.fixture(scope="session")
def launch_env():
    """Factory: `launch_env(**extra)` -> an environment for a multi-process launch (torchrun)
    that is the suite's starting one, not whatever in-process engines and runs have added to
    this worker's since (two full AMD suite runs in three lost both ranks of the sharded-sync
    launch to "terminate called without an active exception"; it passed alone every time)."""
    return lambda **extra: {**SUITE_ENV, **extra}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: `tiny_model(family, seed=0)` -> Path of a cached tiny checkpoint."""
    cache = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(family: str, seed: int = 0):
        assert family in FAMILIES, family
        key = (family, seed)
        if key not in cache:
            cache[key] = build_tiny_model(family, root / f"{family}-s{seed}", seed=seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tiny_model):
    return tiny_model("qwen3_moe")
