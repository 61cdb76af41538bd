"""Run kernels/cuda on the CPU: the .cu files built for the host by g++ with
tests/cuda_host/shim.h, launched as CuPy would launch them, with NumPy standing in for CuPy."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from qformat.kernels.cuda.module import SOURCES

HOST = Path(__file__).resolve().parent / "cuda_host"


def build_host(folder: Path) -> ctypes.CDLL | None:
    """The kernels as a host library (None without g++); AssertionError with g++'s message if
    they do not build."""
    gxx = shutil.which("g++")
    if gxx is None:
        return None
    lib = folder / "libqhost.so"
    out = subprocess.run([gxx, "-std=c++20", "-O1", "-shared", "-fPIC", f"-I{HOST}", f"-I{SOURCES}",
                          str(HOST / "driver.cpp"), "-o", str(lib)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def host_launch(host, function: str, grid, block, args) -> None:
    """Run `function` of the .cu files as CuPy would launch it (grid, block, args), on the host."""
    conv = []
    for a in args:
        if isinstance(a, np.ndarray):
            conv.append(ptr(a))
        elif isinstance(a, (np.float32, float)):
            conv.append(ctypes.c_float(a))
        elif isinstance(a, np.int64):
            conv.append(ctypes.c_longlong(int(a)))
        else:
            conv.append(ctypes.c_int(int(a)))
    block = tuple(block) + (1,) * (2 - len(block))
    getattr(host, f"host_{function}")(grid[0], block[0], block[1], *conv)


class NumpyAsCupy:
    """CuPy's array API as far as kernels/cuda uses it, served by NumPy."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asnumpy(a, stream=None):
        return np.array(a)  # a copy, as from device memory

    @staticmethod
    def matmul(a, b):
        """float16 products accumulated in float32, as cuBLAS does (NumPy's would add in f16)."""
        out = np.matmul(np.asarray(a, np.float32), np.asarray(b, np.float32))
        return out.astype(np.result_type(a, b), copy=False)


def emulate_cuda(monkeypatch, host: ctypes.CDLL) -> None:
    """Point kernels/cuda's CuPy and launchers (module.cupy, module.kernel) at NumPy and the host
    library for the rest of a test."""
    from qformat.kernels.cuda import decoder, module, upload

    def kernel(source: str, function: str):
        return lambda grid, block, args: host_launch(host, function, grid, block, args)

    monkeypatch.setattr(module, "cupy", lambda: NumpyAsCupy())
    monkeypatch.setattr(module, "kernel", kernel)
    monkeypatch.setattr(upload, "STAGING", False)  # no pinned memory: plain copies
    monkeypatch.setattr(decoder, "CUDA_GRAPHS", False)  # no graphs without CuPy: the eager step
