"""Thread count of the CPU kernels."""
from __future__ import annotations

import numba


def set_threads(n: int | None) -> int:
    """Use n threads in the parallel kernels (None: all cores). Returns the count in effect."""
    limit = numba.config.NUMBA_NUM_THREADS
    n = limit if n is None else int(n)
    if not 1 <= n <= limit:
        raise ValueError(f"threads must be between 1 and {limit} (the cores numba can use), got {n}")
    numba.set_num_threads(n)
    return n
