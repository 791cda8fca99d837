"""What this CPU offers, read from /proc/cpuinfo (Linux; elsewhere nothing is assumed)."""

from __future__ import annotations

import functools
import platform

NOTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@functools.cache
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def flags() -> frozenset[str]:
    return frozenset(_cpuinfo().split())


def name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def noted_flags() -> str:
    """The flags that decide speed here (for benchmark notes)."""
    return " ".join(f for f in NOTED_FLAGS if f in flags()) or "no AVX2"


def native_bf16() -> bool:
    """bf16 matrix products in hardware (AVX512-BF16 or AMX): about twice the f32 rate, not an emulation."""
    return bool({"avx512_bf16", "amx_bf16"} & flags())
