"""qerl_rollout.quant: requantize BF16 weights into compressed-tensors FP8/NVFP4 tensors.

Pure math (torch only; no ray, no vllm). `quantize(w, scheme)` returns a `QuantizedWeight`
whose `compressed()` holds exactly what a compressed-tensors 0.17 checkpoint stores for the
layer, bit for bit. Schemes live one per module in `formats/` (`SCHEMES`, `get_scheme`);
kernels (a C++ fast path on CPU with a plain torch twin) live in `kernels/`.
"""

from qerl_rollout.quant.core import QuantizedWeight, quantize
from qerl_rollout.quant.formats import DEFAULT_SCHEME, SCHEMES, QuantScheme, get_scheme

__all__ = ["DEFAULT_SCHEME", "SCHEMES", "QuantScheme", "QuantizedWeight", "get_scheme", "quantize"]
