"""Thread count of the CPU kernels and of the BLAS library numpy uses for the prefill GEMMs.

Numba's OpenMP pool and OpenBLAS's pool both spin-wait between calls. Decode alternates between
them hundreds of times per token, so on a small machine two pools of "all cores" each steal the
other's cores (measured on 2 cores: a 13-token prefill went from 0.1 s to 1-6 s). Both pools are
therefore given the same count, and BLAS runs single-threaded unless asked otherwise.

Work that is mostly BLAS (the prefill GEMMs of the float and dequantized kinds, prefill
attention) is instead split into independent tasks run by `run_tasks` on a pool of Python
threads: single-threaded BLAS and NumPy's loops release the GIL, the pool's threads sleep (not
spin) between calls, and numba kernels called from them run on one thread (numba's thread count
is per calling thread). Measured on 2 cores, prefill of 512 tokens at f16: 474 -> 880 tok/s
(GEMMs and attention on the pool), where a 2-thread BLAS made it 1.8x slower (469 -> 262).
"""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, Iterable

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


_pool: ThreadPoolExecutor | None = None


def _one_numba_thread() -> None:
    numba.set_num_threads(1)


def run_tasks(fn: Callable, tasks: Iterable) -> None:
    """fn(task) for every task, spread over the kernel thread count (numba.get_num_threads() of
    the caller) of pool threads; in the calling thread when that count is 1. Exceptions propagate."""
    global _pool
    tasks = list(tasks)
    n = min(numba.get_num_threads(), len(tasks))
    if n <= 1:
        for task in tasks:
            fn(task)
        return
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(n, thread_name_prefix="qformat", initializer=_one_numba_thread)
    # one future per thread over a strided share, not per task: fewer wake-ups
    for f in [_pool.submit(lambda i=i: [fn(t) for t in tasks[i::n]]) for i in range(n)]:
        f.result()


def run_row_chunks(fn: Callable[[slice], None], n_rows: int, min_rows: int = 1) -> None:
    """fn(rows) over contiguous slices of n_rows rows, one per kernel thread (none shorter than
    min_rows, so that a few rows skip the pool's round trip), through run_tasks."""
    step = max(min_rows, -(-n_rows // numba.get_num_threads()))
    run_tasks(lambda i: fn(slice(i, i + step)), range(0, n_rows, step))
