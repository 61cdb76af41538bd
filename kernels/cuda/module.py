"""CuPy and the .cu sources of this folder as CuPy modules: compiled by NVRTC once per process and
source, and cached on disk by CuPy (CUPY_CACHE_DIR, default ~/.cupy/kernel_cache).

Every module of the backend reaches CuPy and its kernels through `cupy()` and `kernel()` here,
called at run time, so that the tests' host emulation (tests/cuda_emulation.py) replaces both in
one place."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

SOURCES = Path(__file__).resolve().parent
# Flags the tests also give nvcc (tests/test_cuda_kernels.py), so both compilers see one dialect;
# -I: the sources include common.cuh.
NVRTC_OPTIONS = ("-std=c++17", f"-I{SOURCES}")


def cupy():
    """The CuPy module (imported on first use: the backend imports without it)."""
    import cupy as cp

    return cp


def gpu_status() -> tuple[bool, str]:
    """(whether CuPy sees an NVIDIA GPU, its name or why not)."""
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install cupy-cuda13x, or cupy-cuda12x for CUDA 12)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "CuPy sees no GPU"
        return True, cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception as e:  # no driver, or a driver too old for this CuPy
        return False, f"CuPy cannot reach a GPU ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def source_files() -> list[Path]:
    """Every CUDA C source of the backend."""
    return sorted(SOURCES.glob("*.cu"))


@lru_cache(maxsize=None)
def module(name: str):
    """cupy.RawModule of `name`.cu (its extern "C" kernels by name: module(name).get_function(k))."""
    import cupy

    options = NVRTC_OPTIONS
    cuda = cupy.cuda.get_cuda_path()
    if cuda and Path(cuda, "include", "cuda_fp16.h").is_file():  # where NVRTC lacks its own copy
        options += (f"-I{Path(cuda, 'include')}",)
    return cupy.RawModule(code=(SOURCES / f"{name}.cu").read_text(), options=options)


def kernel(name: str, function: str):
    """One compiled kernel, e.g. kernel("gemv", "gemv_q4_q8act_v4")."""
    return module(name).get_function(function)
