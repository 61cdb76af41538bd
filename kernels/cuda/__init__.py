"""CUDA backend: CUDA C kernels (the .cu files beside this module) compiled by CuPy at first use.

Importing it needs CuPy and registers the ("cuda", kind) ops of linear.py. Status: the decode
GEMV and prefill dequantization kernels for q4, q8 and f16 weights, checked against the NumPy
references on the CPU through a host emulation (tests/test_cuda_kernels.py) and compiled by nvcc
in the tests; the whole-model GPU path and its device measurements are issue 5's open work.
"""
from __future__ import annotations

from .linear import register_all

register_all()
