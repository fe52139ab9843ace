"""What the host CPU can do fast, read from /proc/cpuinfo.

Precision choices depend on it: bf16 is fast only with AVX512-BF16 or AMX
(without them PyTorch emulates it, many times slower than fp32), and INT8
kernels are fastest with VNNI or AMX-INT8.
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def has_int8_dot_product() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def describe() -> str:
    flags = cpu_flags()
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    present = [f for f in wanted if f in flags]
    return ", ".join(present) or "no AVX2"
