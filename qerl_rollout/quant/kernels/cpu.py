"""Fast CPU path: builds cpu_quant.cpp once with g++ and calls it through ctypes.

How it works: the C++ source next to this file is compiled into a shared library
(`g++ -O3 -march=native -fopenmp -ffp-contract=off`) cached under
`$QERL_KERNEL_CACHE` (default `~/.cache/qerl_rollout/kernels`), named by a hash of source,
flags and machine, and written atomically so concurrent processes can share it. The kernels
read the weight's raw 16-bit patterns and write the compressed tensors into buffers allocated
here with torch, using torch's thread count. A plain C ABI (no torch headers, no pybind) keeps
the build to about a second.

What it leaves out: anything but contiguous CPU bf16/fp16 input (callers fall back to the
reference twin), and GPUs (Triton kernels live elsewhere). If g++ is missing, the build fails,
or the built kernels disagree with the twin on a probe (`_self_test`, run once at first use),
`available()` is False and the caller uses the reference twin; set `QERL_QUANT_KERNEL=reference`
to force that.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_quant.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def _cache_dir() -> Path:
    root = os.environ.get("QERL_KERNEL_CACHE") or Path.home() / ".cache" / "qerl_rollout" / "kernels"
    return Path(root)


def _build() -> Path:
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + platform.node().encode()).hexdigest()
    lib = _cache_dir() / f"cpu_quant-{key[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [shutil.which("g++") or "g++", *_FLAGS, str(_SOURCE), "-o", tmp]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, lib)
    return lib


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    """The built library, loaded (not yet checked: `available()` also runs the self-test)."""
    if os.environ.get("QERL_QUANT_KERNEL") == "reference":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("qerl_rollout.quant: C++ kernels unavailable, using the torch twin: %s", detail)
        return None
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.qr_absmax_u16.argtypes = [ptr, i64, i64, ptr, c_int]
    lib.qr_absmax_u16.restype = None
    lib.qr_fp8.argtypes = [ptr, c_int, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_float, c_int]
    lib.qr_fp8.restype = ctypes.c_uint16
    lib.qr_int8.argtypes = [ptr, c_int, i64, i64, i64, ptr, ptr, ctypes.c_float, c_int]
    lib.qr_int8.restype = ctypes.c_uint16
    lib.qr_int8_dequant.argtypes = [ptr, ptr, c_int, i64, i64, ptr, c_int]
    lib.qr_int8_dequant.restype = None
    lib.qr_nvfp4.argtypes = [ptr, c_int, i64, i64, i64, ptr, ptr, ptr, c_int]
    lib.qr_nvfp4.restype = ctypes.c_uint16
    lib.qr_fp8_dequant.argtypes = [ptr, ptr, c_int, i64, i64, i64, i64, i64, ptr, c_int]
    lib.qr_fp8_dequant.restype = None
    lib.qr_nvfp4_dequant.argtypes = [ptr, ptr, ptr, c_int, i64, i64, i64, ptr, c_int]
    lib.qr_nvfp4_dequant.restype = None
    return lib


_MADV_HUGEPAGE = 14
_HUGE_MIN_BYTES = 4 << 20


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, with large outputs advised onto transparent huge pages before first touch.

    A fresh multi-MB output is faulted in 4 KiB page by page as the kernel writes it, which
    cost more than the quantization itself on stacked experts (4.5 vs 11 GB/s measured for
    128x768x2048 fp8_block). MADV_HUGEPAGE is a hint: without THP it changes nothing.
    """
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    libc = _libc()
    if libc is not None and nbytes >= _HUGE_MIN_BYTES:
        page = os.sysconf("SC_PAGE_SIZE")
        start = out.data_ptr() & ~(page - 1)
        libc.madvise(start, out.data_ptr() + nbytes - start, _MADV_HUGEPAGE)
    return out


@lru_cache(maxsize=1)
def available() -> bool:
    """The library built and its every kernel gave the torch twin's bytes on a probe."""
    if _lib() is None:
        return False
    bad = _self_test()
    if bad:
        log.warning("qerl_rollout.quant: the C++ kernels differ from the torch twin (%s) on this "
                    "machine; using the twin", ", ".join(bad))
    return not bad


def _self_test() -> list[str]:
    """Names of the kernels whose output differs from `reference` on a fixed probe.

    The probe covers partial 128-blocks, NVFP4 groups and every bf16/fp16 bit class (random
    16-bit patterns with the non-finite ones zeroed), so a miscompiled build (another g++, an
    -march the machine lies about) is caught once, at first use, instead of serving wrong bytes.
    """
    from qerl_rollout.quant.kernels import reference

    bad = []
    for dtype in (torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(0)
        bits = torch.randint(-(2**15), 2**15, (2, 33, 272), generator=g, dtype=torch.int32)
        w = bits.to(torch.int16).view(dtype)
        w = torch.where(torch.isfinite(w), w, torch.zeros((), dtype=dtype))
        eps = reference.fp8_scale_eps(dtype)
        gs = reference.nvfp4_global_scale(reference.absmax(w))
        pairs = {
            "absmax": (absmax(w), reference.absmax(w)),
            "fp8": (fp8(w, (128, 128), eps), reference.fp8(w, (128, 128))),
            "fp8_row": (fp8(w, (1, 272), eps), reference.fp8(w, (1, 272))),
            "int8_rows": (int8(w, eps), reference.int8(w)),
            "nvfp4_groups": (nvfp4(w, gs), reference.nvfp4(w, gs)),
        }
        q, scale = reference.int8(w)
        pairs["int8_dequantize"] = (int8_dequantize(q, scale), reference.int8_dequantize(q, scale))
        q, scale = reference.fp8(w, (128, 128))
        pairs["fp8_dequantize"] = (fp8_dequantize(q, scale, (128, 128)),
                                   reference.fp8_dequantize(q, scale, (128, 128)))
        bad += [f"{name} {dtype}" for name, (fast, twin) in pairs.items() if not _same(fast, twin)]
    return bad


def _same(a, b) -> bool:
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    return all(x.shape == y.shape and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
               for x, y in zip(a, b))


def supports(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype in _INF_BITS and available()


def _check_finite(seen_bits: int, dtype: torch.dtype) -> None:
    if seen_bits >= _INF_BITS[dtype]:
        raise ValueError("weight contains NaN or Inf")


def absmax(w_3d: torch.Tensor) -> torch.Tensor:
    """Per-expert max |w| of an (E, N, K) tensor, in w's dtype; raises on NaN/Inf."""
    w_3d = w_3d.contiguous()
    E = w_3d.shape[0]
    out = torch.empty(E, dtype=torch.int16)
    _lib().qr_absmax_u16(w_3d.data_ptr(), E, w_3d[0].numel(), out.data_ptr(), torch.get_num_threads())
    _check_finite(int(out.max()), w_3d.dtype)
    return out.view(w_3d.dtype)


def fp8(w_3d: torch.Tensor, block: tuple[int, int], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, K) -> (w_fp8 (E, N, K), scale (E, ceil(N/bh), ceil(K/bw)) in w's dtype)."""
    w_3d = w_3d.contiguous()
    E, N, K = w_3d.shape
    bh, bw = block
    w_fp8 = _empty((E, N, K), torch.float8_e4m3fn)
    scale = torch.empty((E, -(-N // bh), -(-K // bw)), dtype=w_3d.dtype)
    seen = _lib().qr_fp8(
        w_3d.data_ptr(), int(w_3d.dtype == torch.bfloat16), E, N, K, bh, bw,
        w_fp8.data_ptr(), scale.data_ptr(), eps, torch.get_num_threads(),
    )
    _check_finite(seen, w_3d.dtype)
    return w_fp8, scale


def int8(w_3d: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, K) -> (w_int8 (E, N, K), scale (E, N, 1) in w's dtype)."""
    w_3d = w_3d.contiguous()
    E, N, K = w_3d.shape
    w_int8 = _empty((E, N, K), torch.int8)
    scale = torch.empty((E, N, 1), dtype=w_3d.dtype)
    seen = _lib().qr_int8(w_3d.data_ptr(), int(w_3d.dtype == torch.bfloat16), E, N, K,
                          w_int8.data_ptr(), scale.data_ptr(), eps, torch.get_num_threads())
    _check_finite(seen, w_3d.dtype)
    return w_int8, scale


def nvfp4(w_3d: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, K) with fp32 global_scale (E,) -> (packed (E, N, K/2) uint8, scale (E, N, K/16) e4m3)."""
    w_3d = w_3d.contiguous()
    E, N, K = w_3d.shape
    global_scale = global_scale.to(torch.float32).contiguous()
    packed = _empty((E, N, K // 2), torch.uint8)
    scale = _empty((E, N, K // 16), torch.uint8)
    seen = _lib().qr_nvfp4(
        w_3d.data_ptr(), int(w_3d.dtype == torch.bfloat16), E, N, K,
        global_scale.data_ptr(), packed.data_ptr(), scale.data_ptr(), torch.get_num_threads(),
    )
    _check_finite(seen, w_3d.dtype)
    return packed, scale.view(torch.float8_e4m3fn)


def fp8_dequantize(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(E, N, K) fp8 and (E, ceil(N/bh), ceil(K/bw)) scales -> (E, N, K) in the scale's dtype."""
    w_fp8, scale = w_fp8.contiguous(), scale.contiguous()
    E, N, K = w_fp8.shape
    out = _empty((E, N, K), scale.dtype)
    _lib().qr_fp8_dequant(w_fp8.data_ptr(), scale.data_ptr(), int(scale.dtype == torch.bfloat16),
                          E, N, K, block[0], block[1], out.data_ptr(), torch.get_num_threads())
    return out


def int8_dequantize(w_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(E, N, K) int8 and (E, N, 1) scales -> (E, N, K) in the scale's dtype."""
    w_int8, scale = w_int8.contiguous(), scale.contiguous()
    E, N, K = w_int8.shape
    out = _empty((E, N, K), scale.dtype)
    _lib().qr_int8_dequant(w_int8.data_ptr(), scale.data_ptr(), int(scale.dtype == torch.bfloat16),
                           E * N, K, out.data_ptr(), torch.get_num_threads())
    return out


def nvfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """(E, N, K/2) packed, (E, N, K/16) e4m3 scales, (E,) fp32 -> (E, N, K) in `dtype`."""
    packed, scale = packed.contiguous(), scale.contiguous().view(torch.uint8)
    global_scale = global_scale.to(torch.float32).contiguous()
    E, N, half_k = packed.shape
    out = _empty((E, N, 2 * half_k), dtype)
    _lib().qr_nvfp4_dequant(packed.data_ptr(), scale.data_ptr(), global_scale.data_ptr(),
                            int(dtype == torch.bfloat16), E, N, 2 * half_k, out.data_ptr(),
                            torch.get_num_threads())
    return out
