"""A projection with a LoRA adapter beside it: y = W x + B (A x), A (r, in) and B (out, r)
float32 (the adapter's scale already in B; runtime/lora.py reads adapters).

LoraOp runs the adapter's two small products through the device's arrays (NumPy, CuPy) around
any layout's op, so every kind of weight takes an adapter. A backend may subclass it: the CPU's
(kernels/cpu/lora.py) runs the decode-step product in its own kernel and in the fused step; a
decode step that cannot run an adapter (CUDA's graph) falls back to the per-operation path.
"""
from __future__ import annotations

import numpy as np


class LoraOp:
    """`base` (any LinearOp) plus B (A x); gemv, gemv_many and gemm as the base's."""

    def __init__(self, base, a: np.ndarray, b: np.ndarray, ops):
        if a.shape[1] != base.in_features or b.shape != (base.out_features, a.shape[0]):
            raise ValueError(f"LoRA A {a.shape} and B {b.shape} do not fit a ({base.out_features}, "
                             f"{base.in_features}) projection")
        self.base = base
        self.out_features, self.in_features = base.out_features, base.in_features
        self.rank = a.shape[0]
        self.a = ops.asarray(np.ascontiguousarray(a, np.float32))  # (r, in)
        self.bt = ops.asarray(np.ascontiguousarray(b.T, np.float32))  # (r, out)

    def gemv(self, x, out):
        self.base.gemv(x, out)
        out += (self.a @ x) @ self.bt
        return out

    def gemv_many(self, x):
        return self.base.gemv_many(x) + (x @ self.a.T) @ self.bt

    def gemm(self, x):
        return self.base.gemm(x) + (x @ self.a.T) @ self.bt

    def fused_row(self):
        return None
