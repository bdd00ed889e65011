"""A scheme is one module in `quant/formats/`: no code outside it names one.

Every fact a scheme carries (block sizes, a shared global scale, its compressed-tensors preset
and format, its vLLM kernels per platform) is an attribute of its `QuantScheme`, and the rest
of the package reads the registry, the kernels too (a scheme names its Triton runner). This
test fails on a string literal equal to a registered scheme's name in any module outside
`quant/formats/` and `bench/` (the benchmarks' per-scheme target tables, which a new scheme
may leave without an entry). Docstrings, tests, configs and docs are exempt;
`bf16` is not a quantization scheme and may be named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qerl_rollout.quant import SCHEMES

PKG = Path(__file__).resolve().parents[1] / "qerl_rollout"
EXEMPT = ("quant/formats/", "bench/")


def scheme_literals(source: str) -> list[tuple[int, str]]:
    """(line, name) of every non-docstring string constant that is a scheme name."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in SCHEMES and id(node) not in docstrings]


def test_the_scanner_sees_literals_but_not_docstrings():
    src = '"""fp8_block is documented."""\nx = "nvfp4"\ndef f():\n    """int8 too."""\n    return {"int8": 1}\n'
    assert scheme_literals(src) == [(2, "nvfp4"), (5, "int8")]


@pytest.mark.parametrize("path", [p for p in sorted(PKG.rglob("*.py"))
                                  if not p.relative_to(PKG).as_posix().startswith(EXEMPT)],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_no_scheme_is_named_outside_its_format_module(path):
    assert scheme_literals(path.read_text()) == []
