"""What this CPU can compute natively, read at run time from /proc/cpuinfo (never assumed:
the same code runs on Xeons with AMX and on AMD EPYCs without AVX-512).

"auto" uses it to pick a CPU precision (docs/cpu_inference.md has the measurements behind
the rule); the benchmark prints it beside every result.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# the flags that decide how fast reduced precision runs, as Linux names them
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # bfloat16 dot products in hardware
NATIVE_BF16_FLAGS = BF16_FLAGS  # the name train/ uses
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # int8 dot products with 32-bit accumulation
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def native_int8(self) -> bool:
        return any(f in self.flags for f in INT8_FLAGS)

    @property
    def reported_flags(self) -> list[str]:
        return [f for f in REPORTED_FLAGS if f in self.flags]

    def describe(self) -> str:
        return f"{self.model} ({', '.join(self.reported_flags) or 'no AVX2'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags from /proc/cpuinfo's text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86, Arm
            flags = frozenset(value.split())
    return CpuInfo(model or platform.processor() or platform.machine(), flags)


# The CPU classes this project meets, for running the test suite as if on each of them
# (tests/conftest.py: --fake-cpu or VCE_FAKE_CPU). Only what this module reports is faked: the
# libraries still run on the real hardware.
CPU_CLASSES = {
    "amx": CpuInfo("Intel Xeon with AMX (faked)", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                                           "amx_tile", "amx_bf16", "amx_int8"})),
    "vnni": CpuInfo("Intel Xeon Cascade Lake (faked)", frozenset({"avx2", "fma", "avx512f", "avx512_vnni"})),
    "zen3": CpuInfo("AMD EPYC Zen 3 (faked)", frozenset({"avx2", "fma"})),
    # Zen 4: AVX-512 with VNNI and BF16 dot products, no AMX (seen in session 8, docs/cpu_inference.md)
    "zen4": CpuInfo("AMD EPYC Zen 4 (faked)", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"})),
}
_faked: CpuInfo | None = None


def fake_cpu(name: str | None) -> None:
    """Report CPU_CLASSES[name] from this_cpu() from now on (None: the real CPU again). For tests."""
    global _faked
    if name is not None and name not in CPU_CLASSES:
        raise ValueError(f"fake CPU: expected one of {sorted(CPU_CLASSES)}, got {name!r}")
    _faked = CPU_CLASSES[name] if name is not None else None


def this_cpu() -> CpuInfo:
    return _faked if _faked is not None else _real_cpu()


@functools.lru_cache(maxsize=1)
def _real_cpu() -> CpuInfo:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no flags known, so no reduced precision is assumed
        return CpuInfo(platform.processor() or platform.machine(), frozenset())


def cpu_flags() -> frozenset[str]:
    """The feature flags the kernel reports for the first CPU (empty where /proc/cpuinfo is absent)."""
    return this_cpu().flags


def cpu_model() -> str:
    return this_cpu().model


def has_native_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 matmuls and convs run at or above the fp32 rate."""
    return this_cpu().native_bf16
