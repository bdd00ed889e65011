"""The package map holds: pure math imports neither ray nor vllm, and packages lean one way.

Checks: a static scan of every import statement in the pure modules (catches an import
hidden inside a function); a fresh interpreter that imports them and then inspects
`sys.modules` (catches a transitive import through a helper module); only `rollout/` imports
vllm and only `workers/` and `placement/ray.py` ray; and the edges between this project's own packages (`EDGES`):
the wire format is imported by the sender (`sync`) and the receiver (`rollout`), which never
import each other, and the engine never pulls in the run config.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qerl_rollout"
FORBIDDEN = ("ray", "vllm")
# Directories whose every module is pure, and single pure modules elsewhere.
PURE_DIRS = ["quant", "wire"]
PURE_MODULES = [
    "dist.py",
    "rl/grpo.py",
    "rl/mismatch.py",
    "rl/aqn.py",
    "sync/merge.py",
]


def _pure_files() -> list[Path]:
    files = [p for d in PURE_DIRS for p in sorted((PKG / d).rglob("*.py"))]
    files += [PKG / m for m in PURE_MODULES if (PKG / m).exists()]
    return files


def _forbidden_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [n for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def test_scanner_catches_a_forbidden_import():
    src = "import torch\ndef f():\n    import vllm.config\n    from ray import remote\n"
    assert _forbidden_imports(src) == ["vllm.config", "ray"]
    assert _forbidden_imports("from . import ray_helpers\nimport rayon\n") == []


def test_pure_packages_exist():
    assert (PKG / "quant" / "__init__.py").exists()
    assert len(_pure_files()) >= 3


@pytest.mark.parametrize("path", _pure_files(), ids=lambda p: str(p.relative_to(PKG)))
def test_pure_module_has_no_forbidden_import(path):
    assert _forbidden_imports(path.read_text()) == []


def test_importing_pure_modules_loads_neither_ray_nor_vllm():
    modules = ["qerl_rollout.quant"] + [
        "qerl_rollout." + m[:-3].replace("/", ".")
        for m in PURE_MODULES
        if (PKG / m).exists()
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# Only `rollout/` may import vllm; only `workers/` and the Ray placement may import ray
# (ARCHITECTURE.md, "The package map"): the local placement runs without Ray.
OWNERS = {"vllm": ("rollout/",), "ray": ("workers/", "placement/ray.py")}


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_vllm_only_in_rollout_and_ray_only_in_workers_and_the_ray_placement(path):
    where = path.relative_to(PKG).as_posix()
    for name in _forbidden_imports(path.read_text()):
        owners = OWNERS[name.split(".")[0]]
        assert where.startswith(owners), f"{where} imports {name}; only {', '.join(owners)} may"


# Package -> the qerl_rollout packages (or top-level modules) it must never import.
EDGES = {
    "wire": {"sync", "rollout", "workers", "rl", "config", "train", "placement"},
    "sync": {"rollout", "workers", "config", "train", "placement"},
    "rollout": {"sync", "workers", "config", "train", "placement"},
    "quant": {"wire", "sync", "rollout", "workers", "rl", "config", "train", "placement"},
    "placement": {"train"},
}


def _project_imports(source: str) -> set[str]:
    """First component under qerl_rollout of every absolute project import in `source`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                 else [])
        found |= {n.split(".")[1] for n in names if n.startswith("qerl_rollout.")}
    return found


def test_the_edge_scanner_sees_imports_inside_functions():
    src = "import qerl_rollout.wire.stream\ndef f():\n    from qerl_rollout.config import QuantConfig\n"
    assert _project_imports(src) == {"wire", "config"}


@pytest.mark.parametrize("package", sorted(EDGES))
def test_packages_lean_one_way(package):
    bad = {str(path.relative_to(PKG)): sorted(_project_imports(path.read_text()) & EDGES[package])
           for path in sorted((PKG / package).rglob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}
