"""Compute kernels for qbin tensors: the (device, kind, form) table, each device's backend, the
shared layout rules (layouts.py) and the NumPy references the kernels are tested against."""
from .registry import LinearOp, backend, device_ops, fused_decoder, linear_op, registered

__all__ = ["LinearOp", "backend", "device_ops", "fused_decoder", "linear_op", "registered"]
