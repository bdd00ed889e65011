"""vLLM-CPU's C++ RMSNorm kernels behind vLLM's RMSNorm IR ops, in place of the torch ones.

Why. vLLM 0.32 runs RMSNorm through IR ops (`vllm.ir.ops.rms_norm`, `fused_add_rms_norm`) and
on CPU dispatches them to `native`: a torch composition (a cast to fp32, pow, mean, rsqrt and
two multiplies, each a pass over the activations in eager mode). Its `vllm_c` implementations
call `torch.ops._C.rms_norm` / `fused_add_rms_norm`, which vLLM-CPU builds too, but are
registered as GPU-only. py-spy put RMSNorm at 20% of an INT8 engine's generation time (Intel
Xeon with AMX, 0.43B MoE); one (256, 1024) BF16 call takes 0.22 ms in C++ against 1.08 ms
native (same machine). The C++ kernel rounds once where native rounds twice: outputs differ by
at most one BF16 ulp.

How it works. `register()` adds the provider `cpu_c` to both ops, supported where vLLM runs on
a CPU and its C++ ops exist; a call it does not fit (a weight of another dtype or none,
`variance_size`, a strided input to the in-place fused op) falls through to `native`. The C++
kernel reads its input as if contiguous (a strided view, such as Qwen3's per-head q/k slices
of the fused qkv output, gave values off by up to 17), so `rms_norm` copies a strided input
first: copy and kernel take 0.11 ms where native takes 0.36 ms on those slices (256 tokens). vLLM loads it in each of its processes as
a general plugin (entry point `vllm.general_plugins`, see pyproject.toml), and the engine also
calls it before starting vLLM. Registering changes nothing by itself: `IR_OP_PRIORITY`, which
`RolloutEngine(cpu_rmsnorm="cpp")` passes to vLLM on CPU, asks for `cpu_c` first (vLLM appends
`native`). vLLM sets the priority process-wide: the engines of a process run one kernel.

Why it is not the default (`rollout.cpu_rmsnorm: torch`). Rollouts are 17-23% faster with it
(`bench rollout --cpp-rmsnorm`, Intel Xeon with AMX), but its numbers sit a little further from
the trainer's HF forward, which rounds as torch does: the push check's mean |dlogp| against
the trainer's QDQ forward on the tiny DeepSeek-V3 NVFP4 engine went from 0.0188 to 0.0237, over
the check's 0.02 bound (router near-ties on random weights; the other families stayed at
0.0016-0.0021). A faster rollout that the trainer agrees with less is a choice, not a default.
"""

import torch
from torch import Tensor

CHOICES = ("torch", "cpp")     # `rollout.cpu_rmsnorm`
PROVIDER = "cpu_c"
IR_OP_PRIORITY = {"rms_norm": [PROVIDER], "fused_add_rms_norm": [PROVIDER]}


def _fits(x, weight, epsilon, variance_size=None) -> bool:
    return variance_size is None and weight is not None and weight.dtype == x.dtype


def _fits_add(x, x_residual, weight, epsilon, variance_size=None) -> bool:
    return (_fits(x, weight, epsilon, variance_size) and x.is_contiguous() and x_residual.is_contiguous()
            and x_residual.dtype == x.dtype)


def _available() -> bool:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "rms_norm") and hasattr(torch.ops._C, "fused_add_rms_norm")


def register() -> None:
    """Add `cpu_c` to vLLM's RMSNorm IR ops (once per process; a vLLM plugin entry point)."""
    from vllm import ir

    if PROVIDER in ir.ops.rms_norm.impls:
        return
    supported = _available()

    @ir.ops.rms_norm.register_impl(PROVIDER, supports_args=_fits, supported=supported)
    def rms_norm(x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None) -> Tensor:
        x = x.contiguous()                  # the kernel ignores strides (module docstring)
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, weight, epsilon)
        return out

    @ir.ops.fused_add_rms_norm.register_impl(PROVIDER, supports_args=_fits_add, supported=supported,
                                             inplace=True)
    def fused_add_rms_norm(x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float,
                           variance_size: int | None = None) -> tuple[Tensor, Tensor]:
        torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
        return x, x_residual
