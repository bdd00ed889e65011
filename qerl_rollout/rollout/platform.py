"""The machine as the rollout engine sees it, in one line (`qerl_rollout.hardware` plus vLLM).

`platform_line()` is the CPU line of `hardware.cpu_line`, the GPU if there is one, the platform
class vLLM picked, and what `quant.mode=auto` resolves to for each scheme here
(`engine.kernel_supported`). It imports vLLM, so it lives in the one package that may.
"""

from __future__ import annotations

from qerl_rollout.hardware import cpu_line
from qerl_rollout.rollout.types import QUANT_SCHEMES


def kernel_paths() -> dict[str, str]:
    """scheme -> `kernel` or `emulate` (`native` for bf16), as `quant.mode=auto` resolves it
    on this machine (a Ray job's driver: the driver's machine)."""
    from qerl_rollout.rollout.engine import kernel_supported

    return {s: "native" if s == "bf16" else ("kernel" if kernel_supported(s)[0] else "emulate")
            for s in QUANT_SCHEMES}


def platform_line(short: bool = False) -> str:
    """The CPU line, the GPU if any, vLLM's platform and (unless `short`) each scheme's kernel
    path under `auto` (imports vLLM)."""
    import torch
    from vllm.platforms import current_platform

    line = f"{cpu_line()}; vLLM platform {type(current_platform).__name__}"
    if torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name(0)}"
    if short:
        return line
    paths = ", ".join(f"{s} {m}" for s, m in kernel_paths().items())
    return f"{line}; auto mode: {paths}"
