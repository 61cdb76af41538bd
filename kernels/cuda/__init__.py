"""CUDA backend: CUDA C kernels (the .cu files beside this module) compiled by CuPy at first use.

Importing it registers the ("cuda", kind) ops of linear.py, the per-token ops of device.py and
the graph-captured decode step of decoder.py; CuPy itself is imported only when they are used.
Checked against the NumPy references and transformers on the CPU through a host emulation
(tests/test_cuda_kernels.py, tests/test_runtime_model.py); not yet run or measured on a GPU
(issue 5).
"""
from __future__ import annotations

from .linear import register_all

register_all()
