"""Every repository path a doc names exists: docstrings and comments, YAML headers, Markdown.

A path is a token ending in a source or doc extension (`train.py`, `configs/grpo_tiny_cpu.yaml`) or
starting with a top-level directory of the repo (`qerl_rollout/sync/`). It resolves if it
exists from the repo root, or if some file or directory of the repo ends with it (so
`kernels/ct_oracle.py` and `sync/sharded.py` may be written relative to their package).
Exempt: outputs a run, a benchmark or wandb writes (`run_dir/...`, `bench/results/...`,
`files/...`), paths inside the dependencies (`EXTERNAL`: `vllm/...`, `verl/...`), globs, and
the placeholders of usage lines (`PLACEHOLDERS`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("qerl_rollout", "tests", "configs", "scripts", "examples", "bench", "docs", "docker", ".ci")
EXT = ("py", "md", "yaml", "yml", "toml", "sh", "cpp", "txt")
PATH = re.compile(r"(?<![\w/.~$<{*-])((?:[\w.-]+/)*[\w-]+\.(?:%s)|(?:%s)/[\w./-]*[\w/])(?![\w(*])"
                  % ("|".join(EXT), "|".join(re.escape(t) for t in TOP)))
GENERATED = ("run_dir/", "bench/results", "files/")
EXTERNAL = ("verl/", "vllm/", "torch/", "transformers/", "peft/", "compressed_tensors/", "ray/")
PLACEHOLDERS = {"FILE.yaml"}
SKIP_DIRS = {".git", ".venv", ".pytest_cache", ".ruff_cache", "__pycache__", "build"}


def _repo_paths() -> set[str]:
    paths = set()
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if not (SKIP_DIRS & set(rel.parts)) and not rel.parts[0].endswith(".egg-info"):
            paths.add(rel.as_posix())
    return paths


def named_paths(text: str) -> list[str]:
    """The repository paths `text` names (see module docstring), exemptions removed."""
    found = []
    for m in PATH.finditer(text):
        path = m.group(1).rstrip("/")
        if path.startswith(GENERATED + EXTERNAL) or path in PLACEHOLDERS:
            continue
        found.append(path)
    return found


def resolves(path: str, repo: set[str]) -> bool:
    return path in repo or any(p.endswith("/" + path) for p in repo)


def _doc_texts() -> list[tuple[str, str]]:
    texts = []
    for f in sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).as_posix() in REPO):
        src = f.read_text()
        docs = [ast.get_docstring(n, clean=False) for n in ast.walk(ast.parse(src))
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        comments = [line for line in src.splitlines() if line.lstrip().startswith("#")]
        texts.append((f.relative_to(ROOT).as_posix(), "\n".join([d for d in docs if d] + comments)))
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        header = [line for line in f.read_text().splitlines() if line.startswith("#")]
        texts.append((f.relative_to(ROOT).as_posix(), "\n".join(header)))
    for f in sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("*/README.md")):
        texts.append((f.relative_to(ROOT).as_posix(), f.read_text()))
    return texts


REPO = _repo_paths()


def test_the_scanner_finds_paths_and_skips_exemptions():
    text = ("see `qerl_rollout/nope.py`, configs/grpo_tiny_cpu.yaml and sharded.py; "
            "writes run_dir/metrics.jsonl and bench/results/x.json; any configs/*.yaml; FILE.yaml; 3/4 GB/s; "
            "NOPE.md")
    assert named_paths(text) == ["qerl_rollout/nope.py", "configs/grpo_tiny_cpu.yaml", "sharded.py", "NOPE.md"]
    assert not resolves("qerl_rollout/nope.py", REPO) and not resolves("NOPE.md", REPO)
    assert resolves("kernels/ct_oracle.py", REPO) and resolves("configs/grpo_tiny_cpu.yaml", REPO)


@pytest.mark.parametrize("source, text", _doc_texts(), ids=lambda v: v if "\n" not in v and len(v) < 80 else "")
def test_every_named_path_exists(source, text):
    missing = [p for p in named_paths(text) if not resolves(p, REPO)]
    assert missing == [], f"{source} names paths that do not exist: {missing}"
