"""Thread count of the CPU kernels and of the BLAS library numpy uses for the prefill GEMMs.

Numba's OpenMP pool and OpenBLAS's pool both spin-wait between calls. Decode alternates between
them hundreds of times per token, so on a small machine two pools of "all cores" each steal the
other's cores (measured on 2 cores: a 13-token prefill went from 0.1 s to 1-6 s). Both pools are
therefore given the same count, and BLAS runs single-threaded unless asked otherwise.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import numba

_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                 "openblas_set_num_threads", "scipy_openblas_set_num_threads", "MKL_Set_Num_Threads")


@lru_cache(maxsize=1)
def _blas_setter():
    """The loaded BLAS library's set-threads function, or None if it cannot be found."""
    import numpy  # noqa: F401  (loads the BLAS library into the process)

    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f
                            if ("blas" in line.lower() or "mkl" in line.lower()) and line.split()[-1].startswith("/")})
    except OSError:  # not Linux: leave BLAS alone
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            if hasattr(lib, name):
                return getattr(lib, name)
    return None


def set_blas_threads(n: int) -> bool:
    """Set the BLAS pool size; False if the BLAS library is not one we know how to steer."""
    setter = _blas_setter()
    if setter is None:
        return False
    setter(ctypes.c_int(n))
    return True


def set_threads(n: int | None, blas_threads: int = 1) -> int:
    """Use n threads in the parallel kernels (None: all cores) and blas_threads in BLAS.

    Returns the kernel thread count in effect."""
    limit = numba.config.NUMBA_NUM_THREADS
    n = limit if n is None else int(n)
    if not 1 <= n <= limit:
        raise ValueError(f"threads must be between 1 and {limit} (the cores numba can use), got {n}")
    numba.set_num_threads(n)
    set_blas_threads(blas_threads)
    return n
