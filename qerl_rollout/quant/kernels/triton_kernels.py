"""Triton fast path for requantization: bf16 weight (optionally + LoRA) -> compressed tensors.

Public API (the torch path in `qerl_rollout.quant` stays the reference and the fallback):

- `triton_available(w)`: True when `w` is a CUDA bf16 tensor and triton imports.
- `quantize_triton(w, scheme, global_amax=None)`: the same dict as
  `quantize(w, scheme, global_amax).compressed()`, bit for bit, for a 2-D (N, K) or a
  stacked 3-D (E, N, K) bf16 weight; one launch covers all experts (grid axis = expert).
- `merge_quantize_triton(w, lora_A, lora_B, scaling, scheme, global_amax=None)`: the same
  dict for the merged weight `merge_lora_reference(w, lora_A, lora_B, scaling)`, which the
  kernel forms tile by tile in registers; the merged bf16 weight is never materialized.
- `merge_lora_reference(...)`: the plain torch twin of that merge; its definition is the
  contract of the fused kernels.

The merge, precisely (per expert; `lora_A` (R, K) or (E, R, K), `lora_B` (N, R) or
(E, N, R), any float dtype; `scaling` a Python float, used as fp32):

    delta = 0 (fp32);  for r in 0..R-1:  delta = delta + fp32(B[:, r]) * fp32(A[r, :])
    merged_bf16 = bf16(fp32(W) + fp32(scaling) * delta)

Every multiply and add is a separately rounded fp32 op (kernels launch with
enable_fp_fusion=False, so no FMA contraction). This differs from
`(W.float() + scaling * (B.float() @ A.float())).to(bf16)` only where the BLAS matmul's
summation order changes the last fp32 bit of delta and that bit decides a bf16 rounding
(rare; the tests check one seeded case equal). The order is fixed because a GEMM's is not:
no two BLAS libraries, nor a tensor-core tile, promise the same one. One adapter per call;
several adapters with different scalings need several calls or a pre-summed delta.

Passes: fp8_block reads W once; fp8_channel and int8 read each row twice (amax, then quantize);
nvfp4 reads W twice (amax pass, quantize pass) unless `global_amax` is given, then once.
The details of each kernel are in triton_fp8.py, triton_int8.py and triton_nvfp4.py, the rounding
helpers in triton_numerics.py. Tile sizes and warp counts are untuned first guesses: no GPU
has run these kernels yet (`python -m qerl_rollout.bench gpu_requant` measures them).
`quant.core.quantize` checks each kernel against the torch twin on its first call per device
and falls back to the twin on a mismatch.

Scheme constants this file assumes of the quantization core: fp8 scales in bf16 with a zero
scale replaced by `FP8_ZERO_SCALE` (compressed-tensors 0.17: finfo(bf16).eps); nvfp4 groups
of 16 along K, the global scale computed per expert (3-D) or per matrix (2-D).
Left out: weight dtypes other than bf16 (`triton_available` says False, the torch path
runs), NaN/Inf weights, K not a multiple of 16 for nvfp4.
"""

from __future__ import annotations

import torch

FP8_ZERO_SCALE = float(torch.finfo(torch.bfloat16).eps)  # compressed-tensors' eps for bf16 scales (fp8, int8)
FP8_BLOCK = 128
NVFP4_GROUP = 16


def triton_available(w: torch.Tensor) -> bool:
    """Whether `quantize_triton` can take `w`: a CUDA bf16 tensor and an importable triton."""
    if not (w.is_cuda and w.dtype == torch.bfloat16 and w.dim() in (2, 3)):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_triton(w: torch.Tensor, scheme, global_amax: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """Compressed-tensors tensors of `w` under `scheme` (see module docstring).

    `global_amax` (nvfp4 only, ignored by the fp8 schemes, as in the core): a scalar or one
    value per expert that replaces the weight's own amax; cast to bf16 first.
    """
    return _run(w, None, scheme, global_amax)


def merge_quantize_triton(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: float, scheme, global_amax: torch.Tensor | None = None
                          ) -> dict[str, torch.Tensor]:
    """Compressed tensors of `merge_lora_reference(w, lora_A, lora_B, scaling)`, fused."""
    return _run(w, _LoraArgs.build(w, lora_A, lora_B, scaling), scheme, global_amax)


@torch.no_grad()
def merge_lora_reference(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """bf16(W + scaling * B @ A) with the rank summed in order, in fp32 (the fused contract)."""
    lora_A, lora_B = lora_A.float(), lora_B.float()
    delta = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for r in range(lora_A.shape[-2]):
        delta = delta + lora_B[..., :, r:r + 1] * lora_A[..., r:r + 1, :]
    return (w.float() + torch.tensor(scaling, dtype=torch.float32) * delta).to(w.dtype)


# ---------------------------------------------------------------------------------------


class _LoraArgs:
    """LoRA factors as 3-D views plus the kernel's stride arguments."""

    def __init__(self, lora_A, lora_B, scaling, rank):
        self.lora_A, self.lora_B, self.scaling, self.rank = lora_A, lora_B, scaling, rank

    @staticmethod
    def build(w, lora_A, lora_B, scaling) -> _LoraArgs:
        if lora_A.dim() != w.dim() or lora_B.dim() != w.dim():
            raise ValueError("lora_A/lora_B must have the weight's number of dims")
        a3 = lora_A if lora_A.dim() == 3 else lora_A.unsqueeze(0)
        b3 = lora_B if lora_B.dim() == 3 else lora_B.unsqueeze(0)
        E, N, K = (w if w.dim() == 3 else w.unsqueeze(0)).shape
        R = a3.shape[1]
        if a3.shape != (E, R, K) or b3.shape != (E, N, R):
            raise ValueError(f"LoRA shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)} "
                             f"do not fit weight {tuple(w.shape)}")
        return _LoraArgs(a3, b3, float(scaling), R)

    def kernel_args(self) -> tuple:
        a, b = self.lora_A, self.lora_B
        return (a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
                self.scaling, self.rank)


def triton_schemes() -> tuple[str, ...]:
    """The registered schemes with a Triton runner (`QuantScheme.triton_runner`)."""
    from qerl_rollout.quant.formats import SCHEMES, get_scheme

    return tuple(name for name in SCHEMES if get_scheme(name).triton_runner)


def _scheme(scheme):
    from qerl_rollout.quant.formats import get_scheme

    name = scheme if isinstance(scheme, str) else getattr(scheme, "name", None)
    if name not in triton_schemes():
        raise ValueError(f"unknown scheme {scheme!r}; triton kernels support {triton_schemes()}")
    return get_scheme(name)


def _run(w, lora, scheme, global_amax) -> dict[str, torch.Tensor]:
    scheme = _scheme(scheme)
    if w.dtype != torch.bfloat16 or w.dim() not in (2, 3):
        raise ValueError(f"triton kernels take a 2-D or 3-D bf16 weight, got {w.dtype} "
                         f"{tuple(w.shape)}")
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    if lora is None:  # placeholders: never read when HAS_LORA is False
        lora = _LoraArgs(w3, w3, 1.0, 0)
    runner = RUNNERS[scheme.triton_runner]
    out = runner(w3, lora, global_amax) if scheme.group_global_scale else runner(w3, lora)
    return out if w.dim() == 3 else {key: t.squeeze(0) for key, t in out.items()}


def _common_args(w3, lora) -> tuple:
    return (w3.shape[1], w3.shape[2], w3.stride(0), w3.stride(1), w3.stride(2),
            *lora.kernel_args())


def _launch_opts(lora) -> dict:
    return {"HAS_LORA": lora.rank > 0, "enable_fp_fusion": False}


def _fp8_block(w3, lora) -> dict[str, torch.Tensor]:
    from qerl_rollout.quant.kernels.triton_fp8 import fp8_block_kernel

    E, N, K = w3.shape
    nb, kb = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    w_fp8 = torch.empty((E, N, K), dtype=torch.uint8, device=w3.device)
    scale = torch.empty((E, nb, kb), dtype=torch.bfloat16, device=w3.device)
    fp8_block_kernel[(nb, kb, E)](
        w3, lora.lora_A, lora.lora_B, w_fp8, scale, *_common_args(w3, lora), FP8_ZERO_SCALE,
        BLOCK=FP8_BLOCK, num_warps=8, **_launch_opts(lora))
    return {"weight": w_fp8.view(torch.float8_e4m3fn), "weight_scale": scale}


def _fp8_channel(w3, lora, block_n: int = 8, block_k: int = 512) -> dict[str, torch.Tensor]:
    from qerl_rollout.quant.kernels.triton_fp8 import fp8_channel_kernel

    E, N, K = w3.shape
    w_fp8 = torch.empty((E, N, K), dtype=torch.uint8, device=w3.device)
    scale = torch.empty((E, N, 1), dtype=torch.bfloat16, device=w3.device)
    fp8_channel_kernel[(-(-N // block_n), E)](
        w3, lora.lora_A, lora.lora_B, w_fp8, scale, *_common_args(w3, lora), FP8_ZERO_SCALE,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **_launch_opts(lora))
    return {"weight": w_fp8.view(torch.float8_e4m3fn), "weight_scale": scale}


def _int8(w3, lora, block_n: int = 8, block_k: int = 512) -> dict[str, torch.Tensor]:
    from qerl_rollout.quant.kernels.triton_int8 import int8_channel_kernel

    E, N, K = w3.shape
    w_int8 = torch.empty((E, N, K), dtype=torch.int8, device=w3.device)
    scale = torch.empty((E, N, 1), dtype=torch.bfloat16, device=w3.device)
    int8_channel_kernel[(-(-N // block_n), E)](
        w3, lora.lora_A, lora.lora_B, w_int8, scale, *_common_args(w3, lora), FP8_ZERO_SCALE,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **_launch_opts(lora))
    return {"weight": w_int8, "weight_scale": scale}


def _nvfp4(w3, lora, global_amax, block_n: int = 32, block_k: int = 128
           ) -> dict[str, torch.Tensor]:
    from qerl_rollout.quant.kernels.triton_nvfp4 import nvfp4_quantize_kernel

    E, N, K = w3.shape
    if K % NVFP4_GROUP:
        raise ValueError(f"nvfp4 needs K divisible by {NVFP4_GROUP}, got K={K}")
    grid = (-(-N // block_n), -(-K // block_k), E)
    if global_amax is None:
        amax = _nvfp4_amax(w3, lora, grid, block_n, block_k)
    else:
        amax = _expert_amax(global_amax, E, w3.device)
    packed = torch.empty((E, N, K // 2), dtype=torch.uint8, device=w3.device)
    scale = torch.empty((E, N, K // NVFP4_GROUP), dtype=torch.uint8, device=w3.device)
    global_scale = torch.empty((E, 1), dtype=torch.float32, device=w3.device)
    nvfp4_quantize_kernel[grid](
        w3, lora.lora_A, lora.lora_B, amax, packed, scale, global_scale,
        *_common_args(w3, lora), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        **_launch_opts(lora))
    return {"weight_packed": packed, "weight_scale": scale.view(torch.float8_e4m3fn),
            "weight_global_scale": global_scale}


def _nvfp4_amax(w3, lora, grid, block_n, block_k) -> torch.Tensor:
    """Pass 1: per-expert amax of W (or of the merged weight), fp32 holding bf16 values."""
    from qerl_rollout.quant.kernels.triton_nvfp4 import nvfp4_amax_kernel

    partial = torch.empty((grid[2], grid[0] * grid[1]), dtype=torch.float32, device=w3.device)
    nvfp4_amax_kernel[grid](
        w3, lora.lora_A, lora.lora_B, partial, *_common_args(w3, lora),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **_launch_opts(lora))
    return partial.amax(dim=1).contiguous()


def _expert_amax(global_amax: torch.Tensor, experts: int, device) -> torch.Tensor:
    """Caller's amax (scalar or one per expert), rounded to bf16 like the weight, as fp32."""
    amax = torch.as_tensor(global_amax).to(device=device).reshape(-1)
    if amax.numel() not in (1, experts):
        raise ValueError(f"global_amax has {amax.numel()} values for {experts} experts")
    return amax.to(torch.bfloat16).float().expand(experts).contiguous()


# A scheme names its runner (`QuantScheme.triton_runner`); a runner with a shared global scale
# (`QuantScheme.group_global_scale`) also takes the global amax.
RUNNERS = {"fp8_blocks": _fp8_block, "fp8_rows": _fp8_channel, "int8_rows": _int8, "nvfp4_groups": _nvfp4}
