"""Compute kernels for qbin tensors: the (device, kind) table and the NumPy references."""
from .registry import LinearOp, linear_op, register, registered

__all__ = ["LinearOp", "linear_op", "register", "registered"]
