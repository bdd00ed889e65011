"""Scheme registry: a quantization format joins by adding one module to `formats/`.

How it works: each module in this package defines a `QuantScheme` subclass and decorates it
with `@register`; `formats/__init__.py` imports every module of the package, so the registry
is complete once `qerl_rollout.quant.formats` is imported. A scheme works on stacked
`(E, N, K)` weights only (`core.quantize` adds and removes the E dim for 2-D weights) and
returns the tensors under the suffix names a compressed-tensors 0.17 checkpoint uses.

It also describes itself for an exporter: `format` (compressed-tensors' CompressionFormat
value) and `config_group(targets)` (one `config_groups` entry, i.e. QuantizationScheme
fields), written as plain dicts so this package needs no compressed-tensors import; a test
checks them against compressed-tensors' presets. What it leaves out: activation
quantization at runtime (vLLM does that) and any scheme-specific file layout beyond tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

_REGISTRY: dict[str, QuantScheme] = {}


class QuantScheme(ABC):
    """Everything the rest of the package asks of a scheme lives on its class: the code
    outside `quant/` reads these attributes and never names a scheme."""

    name: ClassVar[str]
    format: ClassVar[str]  # compressed-tensors CompressionFormat value
    preset: ClassVar[str]  # the compressed-tensors preset scheme this reproduces
    keys: ClassVar[tuple[str, ...]]  # suffixes of compressed() in order
    # Scale blocks: columns per block along K (a TP shard's width must be a multiple: `layout`),
    # rows per block along N (an FSDP rank quantizes its rows alone only if its row chunk is a
    # multiple: `sync.sharded`), and one global scale per fused q/k/v or gate/up group
    # (`wire.stream`: the group's max amax).
    block_width: ClassVar[int | None] = None
    block_rows: ClassVar[int] = 1
    group_global_scale: ClassVar[bool] = False
    # vLLM's kernels (`rollout.engine.kernel_supported`): the least CUDA compute capability and
    # the kernel's name for messages; `cpu_kernel`: vLLM-CPU has one on some CPUs (AMX, zentorch).
    gpu_capability: ClassVar[tuple[int, int]] = (8, 9)
    gpu_kernel: ClassVar[str] = ""
    cpu_kernel: ClassVar[bool] = False
    # The fused merge+quantize Triton kernel on CUDA (`kernels.triton_kernels.RUNNERS`), or
    # None: CUDA tensors of this scheme take the torch twin.
    triton_runner: ClassVar[str | None] = None

    @abstractmethod
    def nbytes(self, n: int, k: int) -> int:
        """Bytes of the compressed tensors of one (N, K) BF16 weight (what an export writes)."""

    def check_shape(self, shape: tuple[int, int, int]) -> None:  # noqa: B027 (optional hook)
        """Raise ValueError if an (E, N, K) weight cannot use this scheme (default: any shape)."""

    @abstractmethod
    def quantize(self, w_3d: torch.Tensor, global_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """(E, N, K) finite float weight -> compressed tensors, each with a leading E dim."""

    @abstractmethod
    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Inverse of quantize up to rounding: (E, N, K) in dtype."""

    @abstractmethod
    def scheme_args(self) -> dict[str, Any]:
        """QuantizationScheme fields: weights and input_activations QuantizationArgs as dicts."""

    def config_group(self, targets: list[str]) -> dict[str, Any]:
        """One `quantization_config.config_groups` entry for this scheme."""
        return {
            "targets": list(targets),
            **self.scheme_args(),
            "output_activations": None,
            "format": self.format,
        }


def register(cls: type[QuantScheme]) -> type[QuantScheme]:
    if cls.name in _REGISTRY:
        raise ValueError(f"quantization scheme {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


DEFAULT_SCHEME = "fp8_block"   # the configs' default, and the plan a bf16 push is cut by


def scheme_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_scheme(name: str) -> QuantScheme:
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(_REGISTRY)
        raise ValueError(f"unknown quantization scheme {name!r}; valid: {valid}") from None


def _quant_args(type_: str, overrides: dict[str, Any]) -> dict[str, Any]:
    args = {
        "num_bits": 8, "type": type_, "symmetric": True, "group_size": None,
        "strategy": None, "block_structure": None, "dynamic": False, "actorder": None,
        "scale_dtype": None, "zp_dtype": None, "observer": None, "observer_kwargs": {},
    }
    args.update(overrides)
    return args


def float_args(**overrides: Any) -> dict[str, Any]:
    """A compressed-tensors QuantizationArgs for floats, as its model_dump(mode="json") writes it."""
    return _quant_args("float", overrides)


def int_args(**overrides: Any) -> dict[str, Any]:
    """The same for symmetric integers."""
    return _quant_args("int", overrides)
