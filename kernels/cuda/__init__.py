"""CUDA backend: CUDA C kernels (the .cu files beside this module) compiled by CuPy at first use.

The registry reads LINEAR_OPS (every layout the converter writes: float, dense and n:m grouped,
W8A8), DEVICE_OPS (device.py's per-token operations) and build_decoder (decoder.py's
graph-captured decode step) and LoraOp (a LoRA adapter's products through CuPy's arrays, on
the per-operation path); CuPy itself is imported only when a kernel runs. Checked against
the NumPy references and transformers on the CPU through a host emulation
(tests/test_cuda_kernels.py, tests/test_cuda_layouts.py, tests/test_runtime_model.py); not yet run
or measured on a GPU.
"""
from __future__ import annotations

from qformat.schemes import FLOAT_KINDS, QUANT_KINDS

from ..layouts import A8, DENSE, NM
from ..lora import LoraOp
from .decoder import build as build_decoder
from .device import CUDAOps
from .linear import CudaDenseOp, CudaGroupQuantOp, CudaW8A8Op

LINEAR_OPS = {
    **{(kind, DENSE): CudaDenseOp for kind in FLOAT_KINDS},
    **{(kind, form): CudaGroupQuantOp for kind in QUANT_KINDS for form in (DENSE, NM)},
    **{(kind, A8): CudaW8A8Op for kind in QUANT_KINDS},
}
DEVICE_OPS = CUDAOps()

__all__ = ["DEVICE_OPS", "LINEAR_OPS", "LoraOp", "build_decoder"]
