"""Which x86 vector extensions this CPU has, read once at import (LLVM's host feature list).

Kernels built on AVX-512 intrinsics are chosen by these flags at import time, never by a branch
inside compiled code: compiling such an intrinsic for a CPU without it is a fatal LLVM error,
not an exception. QFORMAT_PORTABLE_KERNELS=1 turns them all off, so that the portable kernels
can be run (and tested) on any CPU; the compiled-kernel cache is then kept apart.
"""
from __future__ import annotations

import os

PORTABLE = os.environ.get("QFORMAT_PORTABLE_KERNELS", "") == "1"

def host_features() -> dict[str, bool]:
    """LLVM's feature flags of the host CPU ({} where they cannot be read)."""
    from llvmlite.binding import get_host_cpu_features

    try:
        return dict(get_host_cpu_features())
    except RuntimeError:  # features unknown on this platform: take the portable loops
        return {}


_FEATURES = {} if PORTABLE else host_features()
# AVX512-VNNI: vpdpbusd on 512-bit vectors (64 unsigned-by-signed byte products per instruction)
VNNI = bool(_FEATURES.get("avx512vnni", False))
# ... and AVX512-BW: byte shuffles and byte arithmetic on 512-bit vectors
VNNI_BW = VNNI and bool(_FEATURES.get("avx512bw", False))
# ... and AVX512-VBMI: vpmultishiftqb (bit fields to bytes)
VNNI_VBMI = VNNI_BW and bool(_FEATURES.get("avx512vbmi", False))
