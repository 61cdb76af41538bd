"""Float weights (f32, f16, bf16) on the CPU: their op and Numba GEMV, read in place from the map.

16-bit weights are widened in registers: bf16 is the top half of a float32; float16's exponent
and mantissa shifted left by 13 are a float32 that is exactly 2**-112 times the value (normals and
subnormals alike), so the kernel rescales once per row instead of converting element by element
through a table. Rows are processed in blocks so that the widening buffer is allocated once per
block, not per row.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from qformat.schemes import Tensor

from .base import FAST, PARALLEL, IN, ROWS, CODES, CODE_BYTES, GROUP, LinearBase, new_row

BLOCK = 16
_F16_RESCALE = np.float32(2.0 ** 112)


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemv_f32(w, x, out):
    """out = w @ x for float32 w (rows, k)."""
    rows, k = w.shape
    for r in prange(rows):
        acc = np.float32(0.0)
        for c in range(k):
            acc += w[r, c] * x[c]
        out[r] = acc


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemv_f16(w, x, out):
    """out = w @ x for float16 w given as its uint16 bits (rows, k)."""
    rows, k = w.shape
    n_blocks = (rows + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        buf = np.empty(k, np.uint32)
        fbuf = buf.view(np.float32)
        for r in range(b * BLOCK, min(rows, (b + 1) * BLOCK)):
            for c in range(k):
                h = np.uint32(w[r, c])
                buf[c] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
            acc = np.float32(0.0)
            for c in range(k):
                acc += fbuf[c] * x[c]
            out[r] = acc * _F16_RESCALE


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemv_bf16(w, x, out):
    """out = w @ x for bfloat16 w given as its uint16 bits (rows, k)."""
    rows, k = w.shape
    n_blocks = (rows + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        buf = np.empty(k, np.uint32)
        fbuf = buf.view(np.float32)
        for r in range(b * BLOCK, min(rows, (b + 1) * BLOCK)):
            for c in range(k):
                buf[c] = np.uint32(w[r, c]) << np.uint32(16)
            acc = np.float32(0.0)
            for c in range(k):
                acc += fbuf[c] * x[c]
            out[r] = acc


@njit(cache=True, parallel=PARALLEL)
def widen16_rows(w, is_bf16, rows, out):
    """out[i] = float32 of 16-bit row rows[i] of w (uint16 bits of f16 or bf16)."""
    k = w.shape[1]
    for i in prange(rows.size):
        r = rows[i]
        buf = out[i].view(np.uint32)
        for c in range(k):
            h = np.uint32(w[r, c])
            if is_bf16:
                buf[c] = h << np.uint32(16)
            else:
                buf[c] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
        if not is_bf16:
            for c in range(k):
                out[i, c] *= _F16_RESCALE


class DenseOp(LinearBase):
    """f32, f16 or bf16 weights: GEMV in registers, prefill through BLAS on widened rows."""

    def __init__(self, t: Tensor):
        super().__init__(t)
        data = t.arrays["data"]
        self.kind = t.kind
        self.w = data.view(np.uint16) if t.kind in ("f16", "bf16") else data
        self._gemv = GEMV[t.kind]

    def gemv(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        self._gemv(self.w, x, out)
        return out

    def weight_block(self, ids: np.ndarray) -> np.ndarray:
        if self.kind == "f32":
            return self.w[ids]
        out = np.empty((ids.size, self.in_features), np.float32)
        widen16_rows(self.w, self.kind == "bf16", ids, out)
        return out

    def fused_row(self):
        data = np.ascontiguousarray(self.w)
        row = new_row(self.kind)
        row[GROUP], row[IN], row[ROWS] = self.in_features, self.in_features, self.out_features
        row[CODES], row[CODE_BYTES] = data.ctypes.data, data.nbytes // max(self.out_features, 1)
        return row, [data]


GEMV = {"f32": gemv_f32, "f16": gemv_f16, "bf16": gemv_bf16}
