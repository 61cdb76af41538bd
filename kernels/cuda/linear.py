"""CUDA linear ops: a qbin Tensor copied to device memory once, then called on CuPy arrays.

Weights keep the file's layout on the device (gemv.cu reads it as it is). Decode runs the fused
dequantize GEMV of gemv.cu; prefill dequantizes blocks of rows to float16 (dequant.cu) and
multiplies them on the tensor cores through cupy.matmul (cuBLAS). Embedding rows come from the
CPU op, a few rows per call, and are copied up.
"""
from __future__ import annotations

import numpy as np

from qformat.packing import padded_len
from qformat.schemes import Tensor

from ..registry import register
from .module import kernel

# Warps (rows) per block of the GEMV kernels: gemv.cu's ROWS.
ROWS_PER_BLOCK = 4
# Rows dequantized per prefill block: ~64 MiB of float16 at a time.
DEQUANT_BLOCK_BYTES = 64 << 20
_BITS = {"q4": 4, "q8": 8}


def _cupy():
    import cupy

    return cupy


def gemv_variant(kind: str, group: int, row_bytes: int) -> str:
    """Name of the gemv.cu kernel for a grouped weight: q4 on int8 activations (the CPU's decode
    numerics), q8 on float ones (likewise); 16-byte loads (v4) when no 16-byte chunk of a row
    straddles two groups and rows are whole chunks, else 4-byte loads (v1)."""
    gbytes = group * _BITS[kind] // 8
    vec = 4 if gbytes % 16 == 0 and row_bytes % 16 == 0 else 1
    return f"gemv_q4_q8act_v{vec}" if kind == "q4" else f"gemv_{kind}_v{vec}"


def x_padded_len(k: int, group: int) -> int:
    """Columns of the zero-padded activation buffer the GEMV reads (up to the last group's
    padded end)."""
    n_full = k // group
    return n_full * group + padded_len(k - n_full * group) if k % group else k


class _CudaOp:
    def __init__(self, t: Tensor):
        if len(t.shape) != 2:
            raise ValueError(f"tensor {t.name}: a linear weight is 2-D, got shape {list(t.shape)}")
        extra = sorted(set(t.arrays) - set(self._roles))
        if t.sparsity is not None or t.activation is not None or extra:
            what = "n:m sparsity" if t.sparsity is not None else (
                "8-bit activations" if t.activation is not None else "sidecars " + ", ".join(extra))
            raise NotImplementedError(f"tensor {t.name}: {t.kind} with {what} has no CUDA kernel yet; "
                                      "run this file with --device cpu")
        self.name = t.name
        self.out_features, self.in_features = t.shape
        self._tensor = t
        self._cpu_op = None

    def rows(self, ids: np.ndarray):
        """(len(ids), in_features) float32 rows on the device (embedding lookup)."""
        if self._cpu_op is None:
            from qformat.kernels import linear_op

            self._cpu_op = linear_op("cpu", self._tensor)
        return _cupy().asarray(np.ascontiguousarray(self._cpu_op.rows(np.asarray(ids, np.int64))))


class CudaGroupQuantOp(_CudaOp):
    """q4 and q8 weights, symmetric or affine, groups of a multiple of 8 columns. Decode: q4 on
    int8 activations quantized per group, q8 on float ones, as the CPU backend computes them."""

    _roles = ("codes", "scales", "zeros")

    def __init__(self, t: Tensor):
        super().__init__(t)
        cp = _cupy()
        k = self.in_features
        self.group = min(t.group_size, k)
        if self.group % 8:
            raise NotImplementedError(f"tensor {t.name}: groups of {self.group} columns; the CUDA kernels "
                                      "take multiples of 8 (run with --device cpu)")
        a = t.arrays
        self.kind = t.kind
        self.codes = cp.asarray(np.ascontiguousarray(a["codes"]))
        self.scales = cp.asarray(np.ascontiguousarray(a["scales"]).view(np.float16))
        self.has_zeros = "zeros" in a
        self.zeros = cp.asarray(np.ascontiguousarray(a["zeros"])) if self.has_zeros else cp.zeros(1, cp.uint8)
        self.row_bytes = int(self.codes.shape[1])
        self._gemv = kernel("gemv", gemv_variant(t.kind, self.group, self.row_bytes))
        self._dequant = kernel("dequant", f"dequant_{t.kind}_f16")
        n_groups = -(-k // self.group)
        self.int8_activations = t.kind == "q4"
        if self.int8_activations:  # quantize_groups' outputs, reused by every call
            self._quantize = kernel("gemv", "quantize_groups")
            self._xq = cp.zeros(n_groups * self.group, cp.int8)
            self._d = cp.zeros(n_groups, cp.float32)
            self._sums = cp.zeros(n_groups, cp.int32)
        else:  # the zero-padded float activations of the q8 GEMV
            self._x = cp.zeros(x_padded_len(k, self.group), cp.float32)
        self._block = max(1, DEQUANT_BLOCK_BYTES // (2 * k))

    def _args(self):
        return (self.codes, self.scales, self.zeros, np.int32(self.has_zeros))

    def gemv(self, x, out):
        """out (out_features,) float32 = W @ x, x (in_features,) float32, both on the device
        (out contiguous: the kernel writes it)."""
        rows, k, group = self.out_features, self.in_features, self.group
        shape = (np.int32(rows), np.int32(k), np.int32(group), np.int32(self.row_bytes))
        grid = ((rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,)
        if self.int8_activations:
            x = _cupy().ascontiguousarray(x)
            self._quantize((self._d.size,), (32,), (x, self._xq, self._d, self._sums, np.int32(k), np.int32(group)))
            self._gemv(grid, (32, ROWS_PER_BLOCK), (*self._args(), self._xq, self._d, self._sums, out, *shape))
        else:
            self._x[:k] = x
            self._gemv(grid, (32, ROWS_PER_BLOCK), (*self._args(), self._x, out, *shape))
        return out

    def dequantize_rows(self, row0: int, n_rows: int):
        """float16 (n_rows, in_features) = rows row0.. of W."""
        cp = _cupy()
        out = cp.empty((n_rows, self.in_features), cp.float16)
        threads = n_rows * (self.row_bytes // 4)
        self._dequant(((threads + 255) // 256,), (256,),
                      (*self._args(), out, np.int32(row0), np.int32(n_rows), np.int32(self.in_features),
                       np.int32(self.group), np.int32(self.row_bytes)))
        return out

    def gemm(self, x):
        """(n, out_features) float32 = x @ W.T for x (n, in_features) on the device: float16
        blocks of rows times float16 activations, accumulated in float32 by cuBLAS."""
        cp = _cupy()
        xh = x.astype(cp.float16)
        out = cp.empty((x.shape[0], self.out_features), cp.float32)
        for r0 in range(0, self.out_features, self._block):
            n = min(self._block, self.out_features - r0)
            out[:, r0:r0 + n] = cp.matmul(xh, self.dequantize_rows(r0, n).T)
        return out


class CudaDenseOp(_CudaOp):
    """f16 weights (gemv.cu's gemv_f16); f32 and bf16 are widened to f32 for cuBLAS."""

    _roles = ("data",)

    def __init__(self, t: Tensor):
        super().__init__(t)
        cp = _cupy()
        data = np.ascontiguousarray(t.arrays["data"])
        if t.kind == "f16":
            self.w = cp.asarray(data.view(np.float16))
        elif t.kind == "bf16":  # float32 with the bf16 bits on top: exact
            self.w = cp.asarray((data.view(np.uint16).astype(np.uint32) << 16).view(np.float32))
        else:
            self.w = cp.asarray(data)
        self.kind = t.kind
        self._gemv = kernel("gemv", "gemv_f16") if t.kind == "f16" else None

    def gemv(self, x, out):
        if self._gemv is None:
            out[...] = self.w @ x
            return out
        x = _cupy().ascontiguousarray(x)
        rows = self.out_features
        self._gemv(((rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,), (32, ROWS_PER_BLOCK),
                   (self.w, x, out, np.int32(rows), np.int32(self.in_features)))
        return out

    def gemm(self, x):
        cp = _cupy()
        if self.kind == "f16":
            return cp.matmul(x.astype(cp.float16), self.w.T).astype(cp.float32)
        return x @ self.w.T


def register_all() -> None:
    """Fill the (cuda, kind) table and the device's per-token operations."""
    from ..registry import register_decoder, register_device_ops
    from .decoder import build
    from .device import CUDAOps

    register_device_ops("cuda", CUDAOps())
    register_decoder("cuda", build)
    for kind in ("f16", "bf16", "f32"):
        register("cuda", kind, CudaDenseOp)
    for kind in _BITS:
        register("cuda", kind, CudaGroupQuantOp)
