"""CUDA linear ops: a qbin Tensor copied to device memory once, then called on CuPy arrays.

Weights keep the file's layout on the device (the kernels read it as it is). Decode runs a fused
dequantize GEMV: gemv.cu's word kernels for dense q4 and q8 rows (what the converter writes by
default), its generic kernel for every other layout (q6, q5, q3, q2, nf4, n:m sparsity). Prefill
dequantizes blocks of rows to float16 (dequant.cu) and multiplies them on the tensor cores
through cupy.matmul (cuBLAS). Sidecars (perm, outliers, 16-bit columns) and W8A8's int8
activations are the kernels of sidecars.cu around that product. The numbers are the CPU
backend's (kernels/reference.py models both): q4 on int8 activations in decode, float elsewhere.
Embedding rows are dequantized on the host by the format's NumPy reference (Tensor.take_rows, a
few rows per call) and copied up: exact float32, as the CPU backend gives them.
"""
from __future__ import annotations

import numpy as np

from qformat.constants import NF4_LEVELS
from qformat.packing import padded_len
from qformat.schemes import KINDS, Tensor

from ..layouts import q8act, w8a8_static
from . import module
from .upload import to_device

# Warps (rows) per block of the GEMV kernels: gemv.cu's ROWS.
ROWS_PER_BLOCK = 4
# Threads per block of the element-wise kernels, and sidecars.cu's TOKEN_THREADS.
THREADS = 256
# Rows dequantized per prefill block: ~64 MiB of float16 at a time.
DEQUANT_BLOCK_BYTES = 64 << 20
# Roles of a W8A8 tensor's int8 part; the rest are added in float (spec §6.5).
DENSE_ROLES = ("codes", "scales", "zeros", "perm", "sparse_index")
SIDE_ROLES = ("outlier_rowptr", "outlier_cols", "outlier_values", "fp_cols", "fp_weight")


def gemv_variant(kind: str, group: int, row_bytes: int) -> str:
    """Name of the gemv.cu word kernel for a dense q4/q8 weight (group % 8 == 0): q4 on int8
    activations (the CPU's decode numerics), q8 on float ones (likewise); 16-byte loads (v4) when
    no 16-byte chunk of a row straddles two groups and rows are whole chunks, else 4-byte (v1)."""
    gbytes = group * KINDS[kind].bits // 8
    vec = 4 if gbytes % 16 == 0 and row_bytes % 16 == 0 else 1
    return f"gemv_q4_q8act_v{vec}" if kind == "q4" else f"gemv_{kind}_v{vec}"


def x_padded_len(k: int, group: int) -> int:
    """Columns of the zero-padded activation buffer the q8 word kernel reads (up to the last
    group's padded end)."""
    n_full = k // group
    return n_full * group + padded_len(k - n_full * group) if k % group else k


def _grid(n: int, per_block: int) -> tuple[int]:
    return ((n + per_block - 1) // per_block,)


class _CudaOp:
    def __init__(self, t: Tensor):
        if len(t.shape) != 2:
            raise ValueError(f"tensor {t.name}: a linear weight is 2-D, got shape {list(t.shape)}")
        self.name = t.name
        self.out_features, self.in_features = t.shape
        self._tensor = t

    def rows(self, ids: np.ndarray):
        """(len(ids), in_features) float32 rows on the device (embedding lookup)."""
        rows = self._tensor.take_rows(ids).dequantize()
        return module.cupy().asarray(np.ascontiguousarray(rows, np.float32))

    def gemv_many(self, x):
        """Every token's GEMV of x (n, in_features), one launch each (batched decode, eager)."""
        out = module.cupy().empty((x.shape[0], self.out_features), np.float32)
        for i in range(x.shape[0]):
            self.gemv(x[i], out[i])
        return out


class CudaSidecars:
    """A grouped tensor's perm, CSR outliers, 16-bit columns and offsets on the device (each optional).

    `stored_x` gives the dense part's input (x in stored column order, 16-bit columns zeroed, as
    reference.dense_input); `add` adds outliers · x and fp_weight · x[fp_cols] from the logical x."""

    def __init__(self, t: Tensor):
        cp = module.cupy()
        a = t.arrays
        k = t.shape[1]
        if "input_scale" in a:  # CudaW8A8Op divides by it before its dense part (which never sees it)
            raise NotImplementedError(f"tensor {t.name}: input_scale without int8 activations (spec §6.5) has "
                                      "no CUDA kernel; re-convert the model (qconvert writes it only for W8A8)")
        self.gathers = "perm" in a or "fp_cols" in a
        self.src = None
        if self.gathers:  # stored column c reads x[src[c]]; -1: a 16-bit column, read as 0
            src = np.asarray(a["perm"], np.int32) if "perm" in a else np.arange(k, dtype=np.int32)
            if "fp_cols" in a:
                src = np.where(np.isin(src, np.asarray(a["fp_cols"])), -1, src).astype(np.int32)
            self.src = cp.asarray(src)
        self.n_rowptr = 0
        none_i, none_h = cp.zeros(1, cp.int32), cp.zeros(1, cp.float16)
        self.rowptr, self.cols, self.vals = none_i, none_i, none_h
        if "outlier_rowptr" in a:
            self.rowptr = cp.asarray(np.asarray(a["outlier_rowptr"], np.int32))
            self.n_rowptr = int(self.rowptr.size)
            if int(a["outlier_rowptr"][-1]):
                self.cols = cp.asarray(np.asarray(a["outlier_cols"], np.int32))
                self.vals = to_device(np.asarray(a["outlier_values"]).view(np.float16))
        self.n_fp = int(np.asarray(a["fp_cols"]).size) if "fp_cols" in a else 0
        self.fp_cols, self.fp_weight = none_i, none_h
        if self.n_fp:
            self.fp_cols = cp.asarray(np.asarray(a["fp_cols"], np.int32))
            self.fp_weight = to_device(np.asarray(a["fp_weight"]).view(np.float16))
        self.adds = bool(self.n_rowptr or self.n_fp)
        # offsets (spec §4.2): the dense part runs with zeros 0; add_offsets adds o · group sums
        self.offsets = to_device(np.asarray(a["offsets"]).view(np.float16)) if "offsets" in a else None
        self.group = min(t.group_size, k) if t.group_size else k
        self.n_groups = -(-k // self.group)

    def stored_x(self, x, out):
        """out (n, k) or (k,) = x gathered into stored column order; returns out."""
        n = out.size // out.shape[-1]
        k = out.shape[-1]
        module.kernel("sidecars", "gather_columns")(_grid(n * k, THREADS), (THREADS,),
                                                    (x, out, self.src, np.int32(n), np.int32(k)))
        return out

    def add_offsets(self, xs, y, quantized=None) -> None:
        """y (n, rows) or (rows,) += offsets · the group sums of xs (n, k) or (k,), the stored-order
        input; quantized: the (codes, scales, code sums) of the int8 activations a GEMV ran on,
        whose sums the offsets then take (spec §4.2)."""
        cp = module.cupy()
        rows, k = y.shape[-1], xs.shape[-1]
        n = y.size // rows
        if quantized is not None:
            _, d, code_sums = quantized
            sums = cp.ascontiguousarray(d * code_sums.astype(cp.float32))
        else:
            sums = cp.empty(n * self.n_groups, cp.float32)
            module.kernel("sidecars", "group_sums")(_grid(n * self.n_groups, THREADS), (THREADS,),
                                                    (xs, sums, np.int32(n), np.int32(k), np.int32(self.group),
                                                     np.int32(self.n_groups)))
        module.kernel("sidecars", "add_offsets")((rows,), (32, 4), (sums, y, np.int32(n), np.int32(rows),
                                                                    self.offsets, np.int32(self.n_groups)))

    def add(self, x, y) -> None:
        """y (n, rows) or (rows,) += the sidecars' products with x (n, k) or (k,), both contiguous."""
        rows, k = y.shape[-1], x.shape[-1]
        n = y.size // rows
        module.kernel("sidecars", "add_sidecars")(
            (rows,), (32, 4), (x, y, np.int32(n), np.int32(rows), np.int32(k), self.rowptr, np.int32(self.n_rowptr),
                               self.cols, self.vals, self.fp_cols, self.fp_weight, np.int32(self.n_fp)))


class CudaGroupQuantOp(_CudaOp):
    """q8, q6, q5, q4, q3, q2 and nf4 weights, symmetric or affine, dense or n:m sparse, with any
    sidecars. Decode: q4, q5 and q6 on int8 activations quantized per group, the others on float ones, as
    the CPU backend computes them."""

    def __init__(self, t: Tensor, float_activations: bool = False):
        super().__init__(t)
        if t.activation is not None:
            raise ValueError(f"tensor {t.name}: W8A8; use kernels.cuda.linear.CudaW8A8Op")
        cp = module.cupy()
        k = self.in_features
        kind = KINDS[t.kind]
        a = t.arrays
        self.kind, self.bits, self.nf4 = t.kind, kind.bits, kind.nf4
        self.group = min(t.group_size, k)
        self.n, self.m = t.sparsity or (0, 0)
        if self.m and (k % self.m or self.group % self.m):
            raise NotImplementedError(f"tensor {t.name}: {self.n}:{self.m} sparsity over groups of {self.group} "
                                      f"and rows of {k} columns has no CUDA kernel (run with --device cpu)")
        self.codes = to_device(a["codes"])
        self.scales = to_device(np.asarray(a["scales"]).view(np.float16))
        self.has_zeros = "zeros" in a or "offsets" in a  # offsets: the codes' part with zeros 0
        self.zeros = (to_device(a["zeros"]) if "zeros" in a else cp.zeros(a["scales"].shape, cp.uint8)
                      if self.has_zeros else cp.zeros(1, cp.uint8))
        self.index = to_device(a["sparse_index"]) if self.m else cp.zeros((1, 1), cp.uint8)
        self.levels = cp.asarray(NF4_LEVELS.astype(np.float32)) if self.nf4 else cp.zeros(1, cp.float32)
        self.row_bytes = int(self.codes.shape[1])
        self.side = CudaSidecars(t)
        self.int8_activations = q8act(t.kind, self.group, sparse=bool(self.m)) and not float_activations
        # the word kernels read dense rows of whole 32-bit words, q4 on int8 activations and q8 on
        # float ones; everything else is generic
        self.words = (self.m == 0 and self.group % 8 == 0
                      and (t.kind == "q8" or t.kind == "q4" and self.int8_activations))
        if self.words:
            self._gemv = module.kernel("gemv", gemv_variant(t.kind, self.group, self.row_bytes))
            self._dequant = module.kernel("dequant", f"dequant_{t.kind}_f16")
        else:
            self._gemv = module.kernel("gemv", "gemv_generic")
            self._dequant = module.kernel("dequant", "dequant_generic_f16")
        n_groups = -(-k // self.group)
        none_f = cp.zeros(1, cp.float32)
        self._xq, self._d, self._sums = cp.zeros(1, cp.int8), none_f, cp.zeros(1, cp.int32)
        if self.int8_activations:  # quantize_groups' outputs, reused by every call
            self._quantize = module.kernel("gemv", "quantize_groups")
            self._xq = cp.zeros(n_groups * self.group, cp.int8)
            self._d = cp.zeros(n_groups, cp.float32)
            self._sums = cp.zeros(n_groups, cp.int32)
        self._x = None
        if self.words and t.kind == "q8":  # the word kernel's zero-padded float activations
            self._x = cp.zeros(x_padded_len(k, self.group), cp.float32)
        # the stored-order input of a gathering tensor: the head of the padded buffer where there is one
        self._xs = (self._x[:k] if self._x is not None else cp.zeros(k, cp.float32)) if self.side.gathers else None
        self._block = max(1, DEQUANT_BLOCK_BYTES // (2 * k))

    def _weights(self):
        return (self.codes, self.scales, self.zeros, np.int32(self.has_zeros))

    def _layout(self):
        """gemv_generic's and dequant_generic_f16's layout arguments after k."""
        return (np.int32(self.group), np.int32(self.row_bytes), np.int32(self.bits), np.int32(self.nf4),
                np.int32(self.n), np.int32(self.m))

    @property
    def shared_input(self):
        """Equal for ops whose GEMV quantizes one input to the same int8 codes (the decode step then
        quantizes it once, see `quantize`); None where the GEMV reads float or gathered input."""
        return (self.in_features, self.group) if self.int8_activations and not self.side.gathers else None

    def quantize(self, x):
        """x's int8 codes, scales and code sums per group (quantize_groups) in this op's buffers."""
        self._quantize((self._d.size,), (32,), (x, self._xq, self._d, self._sums, np.int32(self.in_features),
                                                np.int32(self.group)))
        return self._xq, self._d, self._sums

    def gemv(self, x, out, add=None, quantized=None):
        """out (out_features,) float32 = W @ x (+ add, a residual or bias: may be out itself), x
        (in_features,) float32, all on the device (out contiguous: the kernels write it).
        quantized: `quantize(x)` of an op with the same `shared_input`, instead of quantizing again."""
        cp = module.cupy()
        rows, k = self.out_features, self.in_features
        x = cp.ascontiguousarray(x)
        xs = self.side.stored_x(x, self._xs) if self.side.gathers else x
        if self.int8_activations:
            xq, d, sums = quantized = quantized or self.quantize(xs)
        else:
            quantized = None
            xq, d, sums = self._xq, self._d, self._sums  # unread
        grid, block = _grid(rows, ROWS_PER_BLOCK), (32, ROWS_PER_BLOCK)
        # out, the added vector (any float array where none: the kernel does not read it), whether one
        y = (out, add if add is not None else self._d, np.int32(add is not None))
        if not self.words:
            self._gemv(grid, block, (*self._weights(), self.index, np.int32(self.index.shape[1]), self.levels, xs,
                                     xq, d, *y, np.int32(rows), np.int32(k), *self._layout(),
                                     np.int32(self.int8_activations)))
        else:
            shape = (np.int32(rows), np.int32(k), np.int32(self.group), np.int32(self.row_bytes))
            if self.int8_activations:
                self._gemv(grid, block, (*self._weights(), xq, d, sums, *y, *shape))
            else:
                if xs is not self._xs:  # gathered straight into the padded buffer otherwise
                    self._x[:k] = xs
                self._gemv(grid, block, (*self._weights(), self._x, *y, *shape))
        if self.side.offsets is not None:
            self.side.add_offsets(xs, out, quantized)
        if self.side.adds:
            self.side.add(x, out)
        return out

    def stored_rows(self, row0: int, n_rows: int):
        """float16 (n_rows, in_features) = rows row0.. of the dense part in stored column order
        (sidecars not added; an n:m row's pruned columns 0)."""
        cp = module.cupy()
        k = self.in_features
        out = (cp.zeros if self.m else cp.empty)((n_rows, k), cp.float16)
        if self.words:
            self._dequant(_grid(n_rows * (self.row_bytes // 4), THREADS), (THREADS,),
                          (*self._weights(), out, np.int32(row0), np.int32(n_rows), np.int32(k),
                           np.int32(self.group), np.int32(self.row_bytes)))
        else:
            kept = k * self.n // self.m if self.m else k
            self._dequant(_grid(n_rows * kept, THREADS), (THREADS,),
                          (*self._weights(), self.index, np.int32(self.index.shape[1]), self.levels, out,
                           np.int32(row0), np.int32(n_rows), np.int32(k), *self._layout()))
        return out

    def gemm(self, x):
        """(n, out_features) float32 = x @ W.T for x (n, in_features) on the device: float16
        blocks of rows times float16 activations, accumulated in float32 by cuBLAS; sidecars
        added in float32."""
        cp = module.cupy()
        x = cp.ascontiguousarray(x, cp.float32)
        xs = self.side.stored_x(x, cp.empty_like(x)) if self.side.gathers else x
        xh = xs.astype(cp.float16)
        out = cp.empty((x.shape[0], self.out_features), cp.float32)
        for r0 in range(0, self.out_features, self._block):
            n = min(self._block, self.out_features - r0)
            out[:, r0:r0 + n] = cp.matmul(xh, self.stored_rows(r0, n).T)
        if self.side.offsets is not None:
            self.side.add_offsets(cp.ascontiguousarray(xs), out)
        if self.side.adds:
            self.side.add(x, out)
        return out


class CudaW8A8Op(_CudaOp):
    """A grouped weight whose inputs are quantized to int8 per token (spec §6.5), as the CPU's
    W8A8Op computes it: x' = x / input_scale; the dense part multiplies the int8 quantization of
    x' (16-bit columns zeroed), dequantized, through its own kernels; outliers and 16-bit
    columns are added in float from x'. Reference: kernels.reference.linear_w8a8."""

    def __init__(self, t: Tensor):
        super().__init__(t)
        cp = module.cupy()
        a = t.arrays
        k = self.in_features
        static = w8a8_static(t)
        self.static = np.int32(static)
        self.act_scale = np.float32(a["act_scale"][0]) if static else np.float32(0.0)
        self.dense = CudaGroupQuantOp(Tensor(t.name, t.kind, t.shape, {r: v for r, v in a.items() if r in DENSE_ROLES},
                                             t.group_size, t.symmetric, t.sparsity), float_activations=True)
        self.side = CudaSidecars(Tensor(t.name, t.kind, t.shape, {r: v for r, v in a.items() if r in SIDE_ROLES}))
        self.has_scale = "input_scale" in a
        self.inv_scale = (cp.asarray(np.float32(1.0) / np.asarray(a["input_scale"], np.float32)) if self.has_scale
                          else cp.zeros(1, cp.float32))
        self.has_fp = "fp_cols" in a
        self.fp_mask = cp.zeros(k if self.has_fp else 1, cp.uint8)
        if self.has_fp:
            self.fp_mask[cp.asarray(np.asarray(a["fp_cols"], np.int64))] = 1
        self._x1, self._xa = cp.zeros(k, cp.float32), cp.zeros(k, cp.float32)

    def _inputs(self, x, x1, xa) -> None:
        n = x.size // self.in_features
        module.kernel("sidecars", "w8a8_inputs")((n,), (THREADS,), (
            x, self.inv_scale, np.int32(self.has_scale), self.fp_mask, np.int32(self.has_fp), x1, xa,
            np.int32(self.in_features), self.static, self.act_scale))

    shared_input = None  # its inputs are its own quantization

    def gemv(self, x, out, add=None, quantized=None):
        self._inputs(module.cupy().ascontiguousarray(x), self._x1, self._xa)
        self.dense.gemv(self._xa, out, add)
        if self.side.adds:
            self.side.add(self._x1, out)
        return out

    def gemm(self, x):
        cp = module.cupy()
        x = cp.ascontiguousarray(x, cp.float32)
        x1, xa = cp.empty_like(x), cp.empty_like(x)
        self._inputs(x, x1, xa)
        out = self.dense.gemm(xa)
        if self.side.adds:
            self.side.add(x1, out)
        return out


class CudaDenseOp(_CudaOp):
    """f16 weights (gemv.cu's gemv_f16); f32 and bf16 are widened to f32 for cuBLAS."""

    def __init__(self, t: Tensor):
        super().__init__(t)
        data = np.asarray(t.arrays["data"])
        if t.kind == "f16":
            self.w = to_device(data.view(np.float16))
        elif t.kind == "bf16":  # float32 with the bf16 bits on top: exact
            self.w = to_device((data.view(np.uint16).astype(np.uint32) << 16).view(np.float32))
        else:
            self.w = to_device(data)
        self.kind = t.kind
        self._gemv = module.kernel("gemv", "gemv_f16") if t.kind == "f16" else None

    shared_input = None  # float inputs

    def gemv(self, x, out, add=None, quantized=None):
        """out = W @ x (+ add), as CudaGroupQuantOp.gemv."""
        cp = module.cupy()
        if self._gemv is None:
            if add is None:
                out[...] = self.w @ x
            else:
                cp.add(self.w @ x, add, out=out)
            return out
        x = cp.ascontiguousarray(x)
        rows = self.out_features
        self._gemv(_grid(rows, ROWS_PER_BLOCK), (32, ROWS_PER_BLOCK),
                   (self.w, x, out, add if add is not None else x, np.int32(add is not None), np.int32(rows),
                    np.int32(self.in_features)))
        return out

    def gemm(self, x):
        cp = module.cupy()
        if self.kind == "f16":
            return cp.matmul(x.astype(cp.float16), self.w.T).astype(cp.float32)
        return x @ self.w.T
