"""What this machine's CPU can do for the torch backend's read: the processor's name and the
instruction sets that decide its speed (AVX2, AVX-512, bf16 dot products, AMX), read once.

A CPU with bf16 dot products (AVX512-BF16: AMD Zen 4 and later, Intel Cooper Lake and later;
AMX-BF16: Sapphire Rapids and later) multiplies bf16 matrices at twice its float32 rate, so the
read's products run in bf16 there (pytorch.py). Elsewhere oneDNN emulates bf16 products with
float32 arithmetic, no faster than float32 itself, and the read stays in float32.

STM_KERNELS_CPU_BF16=1 or 0 overrides the detection (tests run the bf16 path on any CPU: its
numerics do not need the instructions, only its speed does).
"""
from __future__ import annotations

import functools
import os
import platform

# the flags that matter for the read's speed, as /proc/cpuinfo names them
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """{"model": the processor's name, "flags": the FLAGS it has} (Linux: /proc/cpuinfo;
    elsewhere the platform's processor string and no flags)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "flags": [flag for flag in FLAGS if flag in flags]}


def bf16_dot_products() -> bool:
    """Whether the read's CPU products run in bf16 (see the module docstring)."""
    forced = os.environ.get("STM_KERNELS_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return any(flag in cpu_info()["flags"] for flag in BF16_DOT_FLAGS)
