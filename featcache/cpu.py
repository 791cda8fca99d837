"""What this CPU offers, read from /proc/cpuinfo (Linux; elsewhere nothing is assumed)."""

from __future__ import annotations

import functools
import os
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


# What each oneDNN dispatch cap (ONEDNN_MAX_CPU_ISA) still allows of the int8 dot-product instructions;
# caps not named here (ALL, DEFAULT, the AMX levels) allow all of them.
CAP_ALLOWS = {"SSE41": (), "AVX": (), "AVX2": (), "AVX512_CORE": (),
              "AVX2_VNNI": ("avx_vnni",), "AVX2_VNNI_2": ("avx_vnni",),
              **{cap: ("avx_vnni", "avx512_vnni") for cap in ("AVX512_CORE_VNNI", "AVX512_CORE_BF16",
                                                              "AVX512_CORE_FP16", "AVX10_1_512")}}


def int8_class() -> str:
    """How oneDNN (inside OpenVINO) will multiply int8 here: "amx", "avx512-vnni", "avx-vnni" (dot products),
    "avx2" (u8 x s8 pair sums in 16 bits, which can saturate) or "other"; ONEDNN_MAX_CPU_ISA can hold it below."""
    found = flags()
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    allowed = CAP_ALLOWS.get(cap, ("amx_int8", "avx512_vnni", "avx_vnni"))
    for flag, kind in (("amx_int8", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni")):
        if flag in found and flag in allowed:
            return kind
    return "avx2" if "avx2" in found and cap not in ("SSE41", "AVX") else "other"


def int8_dot_products() -> bool:
    """Whether int8 products run as VNNI/AMX dot products, with no 16-bit intermediate that can saturate."""
    return int8_class() in ("amx", "avx512-vnni", "avx-vnni")
