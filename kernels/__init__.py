"""Compute kernels for qbin tensors: the (device, kind) table and the NumPy references."""
from .registry import LinearOp, fused_decoder, linear_op, register, register_decoder, registered

__all__ = ["LinearOp", "fused_decoder", "linear_op", "register", "register_decoder", "registered"]
