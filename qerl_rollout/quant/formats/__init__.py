"""Quantization formats: the registry plus one module per scheme.

Importing this package imports every module in it, so dropping a new `@register`ed module
here is all it takes to add a scheme. `SCHEMES` is the tuple of registered names.
"""

from __future__ import annotations

import importlib
import pkgutil

from qerl_rollout.quant.formats.registry import (
    DEFAULT_SCHEME,
    QuantScheme,
    get_scheme,
    register,
    scheme_names,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

SCHEMES: tuple[str, ...] = scheme_names()

__all__ = ["DEFAULT_SCHEME", "SCHEMES", "QuantScheme", "get_scheme", "register"]
