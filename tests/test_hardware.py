"""The platform line: CPU facts parsed from /proc/cpuinfo texts of the machine kinds seen here."""

from __future__ import annotations

from qerl_rollout.hardware import CpuFacts, cpu_facts, cpu_line

# First processor blocks, trimmed to the fields read (flags abridged; the tested ones kept).
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 fma vaes vpclmulqdq

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: avx512f amx_tile
"""
ZEN4 = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512f avx512_bf16\n"
SPR = ("vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
       "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n")


def test_cpu_facts_of_each_kind():
    zen3, zen4, spr = cpu_facts(ZEN3), cpu_facts(ZEN4), cpu_facts(SPR)
    # Only the first processor counts (the second block's flags are not this CPU's).
    assert (zen3.vendor, zen3.model, zen3.avx512, zen3.amx) == ("AuthenticAMD", "AMD EPYC", False, False)
    assert (zen4.avx512, zen4.amx) == (True, False)
    assert (spr.short_vendor, spr.avx512, spr.amx) == ("Intel", True, True)
    assert cpu_facts("").vendor == "unknown"


def test_zen_platform_needs_amd_avx512_and_zentorch():
    base = dict(model="x", amx=False)
    assert CpuFacts("AuthenticAMD", avx512=True, zentorch="2.13.0.2", **base).zen_platform_expected
    assert not CpuFacts("AuthenticAMD", avx512=False, zentorch="2.13.0.2", **base).zen_platform_expected
    assert not CpuFacts("AuthenticAMD", avx512=True, zentorch=None, **base).zen_platform_expected
    assert not CpuFacts("GenuineIntel", avx512=True, zentorch="2.13.0.2", **base).zen_platform_expected


def test_cpu_line_says_when_zentorch_is_unused():
    unused = CpuFacts("AuthenticAMD", "AMD EPYC", avx512=False, amx=False, zentorch="2.13.0.2")
    assert cpu_line(unused) == ("CPU AMD EPYC (AuthenticAMD), AVX-512 no, AMX no, zentorch 2.13.0.2 "
                                "(unused: vLLM's Zen platform needs an AMD CPU with AVX-512)")
    intel = CpuFacts("GenuineIntel", "Xeon", avx512=True, amx=True, zentorch=None)
    assert cpu_line(intel) == "CPU Xeon (GenuineIntel), AVX-512 yes, AMX yes, zentorch not installed"
