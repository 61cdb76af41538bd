"""The CPU's LoraOp: one decode step's adapter product in a compiled kernel (lora_add), which
the fused decode step calls too (a weight-table row with LORA_RANK set, base.py), so a model
with an adapter keeps the one-call step."""
from __future__ import annotations

import numpy as np
from numba import njit

from ..lora import LoraOp
from .base import FAST, LORA_A, LORA_B, LORA_RANK


@njit(cache=True, fastmath=FAST)
def lora_add(a, bt, x, out):
    """out += B (A x) for a = A (r, in), bt = Bᵀ (r, out) and x (in,), float32."""
    r, k = a.shape
    for i in range(r):
        t = np.float32(0.0)
        for j in range(k):
            t += a[i, j] * x[j]
        for o in range(bt.shape[1]):
            out[o] += bt[i, o] * t


class CpuLoraOp(LoraOp):
    """LoraOp whose GEMV adds the product in lora_add, and which fills the fused step's row."""

    def gemv(self, x, out):
        self.base.gemv(x, out)
        lora_add(self.a, self.bt, np.ascontiguousarray(x, np.float32), out)
        return out

    def fused_row(self):
        got = self.base.fused_row()
        if got is None:
            return None
        row, keep = got
        row = list(row)
        row[LORA_RANK], row[LORA_A], row[LORA_B] = self.rank, self.a.ctypes.data, self.bt.ctypes.data
        return row, [*keep, self.a, self.bt]
