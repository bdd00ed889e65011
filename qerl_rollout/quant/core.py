"""`quantize(w, scheme)`: one BF16/FP16 weight -> the tensors a compressed-tensors checkpoint stores.

How it works: the input is validated (floating dtype, 2-D (N, K) or stacked 3-D (E, N, K),
finite values, a shape the scheme accepts), a 2-D weight is viewed as one expert, the
registered scheme quantizes every expert independently (bit-exact with compressed-tensors
0.17, see `kernels/reference.py` for the dtype flow), and the result is wrapped in a
`QuantizedWeight`. For a 2-D input the E dim is dropped again, so `compressed()` has exactly
the per-layer shapes of a checkpoint; for 3-D each tensor keeps its leading E.

`global_amax` (nvfp4 only; ignored by fp8 schemes) replaces each expert's own amax when
computing the NVFP4 global scale, so fused q/k/v or gate/up can share one: pass the largest
amax of the group. A scalar or, for 3-D, an (E,) tensor; it is cast to the weight dtype
first (exact for an amax taken from weights of that dtype).

What it leaves out: choosing which tensors to quantize (plan.py), writing files (export.py),
and activation scales (vLLM computes them dynamically for these schemes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from qerl_rollout.quant.formats import get_scheme
from qerl_rollout.quant.kernels.triton_kernels import quantize_triton, triton_available

log = logging.getLogger(__name__)
_TRITON_VERIFIED: dict[tuple[str, str], bool] = {}

@dataclass(frozen=True)
class QuantizedWeight:
    scheme: str
    shape: tuple[int, ...]  # of the original weight
    dtype: torch.dtype  # of the original weight
    tensors: dict[str, torch.Tensor] = field(repr=False)  # as compressed() returns them

    def compressed(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors keyed by suffix (`weight`, `weight_scale`, ...)."""
        return dict(self.tensors)

    def dequantize(self) -> torch.Tensor:
        """The quantized values back in the original dtype (what emulate mode pushes)."""
        tensors = self.tensors if len(self.shape) == 3 else {k: v[None] for k, v in self.tensors.items()}
        w = get_scheme(self.scheme).dequantize(tensors, self.dtype)
        return w if len(self.shape) == 3 else w[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _validate(w: torch.Tensor, global_amax: torch.Tensor | None) -> None:
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point or w.element_size() < 2:
        dtype = getattr(w, "dtype", type(w).__name__)
        raise ValueError(f"expected a bfloat16/float16/float32 tensor, got {dtype}")
    if w.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D (N, K) or 3-D (E, N, K) weight, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"empty weight of shape {tuple(w.shape)}")
    if global_amax is None:
        return
    n_experts = w.shape[0] if w.ndim == 3 else 1
    if global_amax.numel() not in (1, n_experts):
        raise ValueError(f"global_amax must be a scalar or ({n_experts},), got {tuple(global_amax.shape)}")
    if not bool(torch.isfinite(global_amax).all()) or bool((global_amax < 0).any()):
        raise ValueError(f"global_amax must be finite and >= 0, got {global_amax}")


def quantize(w: torch.Tensor, scheme: str, global_amax: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a 2-D or stacked 3-D weight with a registered scheme (see SCHEMES)."""
    impl = get_scheme(scheme)
    _validate(w, global_amax)
    w_3d = w if w.ndim == 3 else w[None]
    impl.check_shape(tuple(w_3d.shape))
    if impl.triton_runner and triton_available(w) and _triton_verified(w_3d, scheme, global_amax):
        # CUDA bf16: one Triton launch, the same bytes as the twin (kernels/triton_*.py)
        return QuantizedWeight(scheme, tuple(w.shape), w.dtype, quantize_triton(w.detach(), scheme, global_amax))
    tensors = impl.quantize(w_3d.detach(), global_amax)
    if w.ndim == 2:
        tensors = {k: v[0] for k, v in tensors.items()}
    return QuantizedWeight(scheme, tuple(w.shape), w.dtype, tensors)


def _triton_verified(w_3d: torch.Tensor, scheme: str, global_amax: torch.Tensor | None) -> bool:
    """Whether the Triton kernel for `scheme` gave the torch twin's bytes on this device.

    Checked once per (scheme, device), on the first expert's first 256 rows of the first
    weight that reaches it (the twin runs on the same device: `kernels` falls back to the
    plain torch code for CUDA tensors). A mismatch, or a kernel that fails to compile, is
    logged once and that scheme stays on the twin for the rest of the process: never serve
    bytes no test has seen on this hardware.
    """
    key = (scheme, str(w_3d.device))
    if key not in _TRITON_VERIFIED:
        probe = w_3d[:1, :256].detach().contiguous()
        ga = None if global_amax is None else global_amax.reshape(-1)[:1]
        try:
            got = quantize_triton(probe, scheme, ga)
            want = get_scheme(scheme).quantize(probe, ga)
            same = got.keys() == want.keys() and all(
                got[k].shape == want[k].shape
                and torch.equal(got[k].contiguous().view(torch.uint8), want[k].contiguous().view(torch.uint8))
                for k in want)
            why = "its bytes differ from the torch twin's"
        except Exception as e:   # a compile or launch failure: the twin still works
            same, why = False, f"it failed: {type(e).__name__}: {e}"
        if not same:
            log.warning("qerl_rollout.quant: Triton %s kernel not used on %s: %s", scheme, key[1], why)
        _TRITON_VERIFIED[key] = same
    return _TRITON_VERIFIED[key]
