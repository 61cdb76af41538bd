"""Compute kernels for qbin tensors: the (device, kind) table and the NumPy references."""
from .registry import (LinearOp, device_ops, fused_decoder, linear_op, register, register_decoder,
                       register_device_ops, registered)

__all__ = ["LinearOp", "device_ops", "fused_decoder", "linear_op", "register", "register_decoder",
           "register_device_ops", "registered"]
