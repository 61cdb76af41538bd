"""W8A8 on the CPU: int8 weights times int8 activations, summed in int32 (spec §6.5).

Weights: q8 codes c in [0, 255] with one scale per row (per channel) and zero-point z (128 when
symmetric), read in place from the memory map. Activations: one int8 code row per token,
a = round(x / d) with d = max|x| / 127 per token (dynamic) or the stored act_scale (static).
Then  y[i, r] = s_r · d_i · (Σ_j c_rj a_ij − z_r Σ_j a_ij):  the unsigned-times-signed byte dot
product needs neither a copy nor a sign flip of the codes, and the zero-point costs one
multiply per row (the sums of the activation codes are computed once per token). LLVM compiles
the plain byte loops to AVX-512 VNNI `vpdpwssd` (bytes widened to int16 pairs, 32 multiply-adds
per instruction; checked with `inspect_asm`) but never forms the byte-wide `vpdpbusd` (64 per
instruction) from generic IR. On CPUs with AVX512-VNNI the kernels therefore call
`llvm.x86.avx512.vpdpbusd.512` directly (the `_vnni_*` intrinsics below, 64 columns per step,
the last K mod 64 columns by the plain loop): prefill GEMM measured 390 vs 147 GOP/s on one core
(Zen 5), decode GEMV see bench/bench_decode.py. Elsewhere the plain loops run.

Overflow: |c·a| ≤ 255·127 and K ≤ 2**31 / 32385 ≈ 66 000 columns fit int32; `check_width` refuses
wider rows. NumPy has no int8 matmul: the prefill GEMM is the same integer kernel on 2x2 tiles
of (rows, tokens) (see gemm_w8a8), measured 1.2x faster than dequantize-then-float-BLAS.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qformat.schemes import Tensor

from . import gemm_vnni
from ..layouts import w8a8_static
from .base import ACT, ACT_SCALE, H2F, PARALLEL, LinearBase, Sidecars, grouped_row
from .features import VNNI
from .grouped import GroupQuantOp
from .sparse import SparseGroupQuantOp

# int32 accumulation of up to 255 * 127 per column
MAX_COLUMNS = (2**31 - 1) // (255 * 127)
# Rows per parallel task: a 192-row projection still splits evenly over two threads.
ROW_BLOCK = 32




def check_width(k: int, name: str) -> None:
    """ValueError when int32 accumulation could overflow for rows of k columns."""
    if k > MAX_COLUMNS:
        raise ValueError(f"tensor {name}: {k} input columns overflow the int32 sums of W8A8 "
                         f"(at most {MAX_COLUMNS}); store it without activation quantization")


@njit(cache=True)
def quantize_tokens(x, act_scale, static, xq, d, sums):
    """x (n, k) float32 -> xq (n, k) int8 codes, d (n,) scales, sums (n,) int32 of the codes.

    Dynamic: d = max|x| / 127 per row (a zero row: d = 0, codes 0); static: d = act_scale and
    codes saturate at ±127. No fastmath: x / d must round as qformat.kernels.reference does."""
    n, k = x.shape
    for i in range(n):
        if static:
            di = np.float32(act_scale)
        else:
            amax = np.float32(0.0)
            for j in range(k):
                amax = max(amax, abs(x[i, j]))
            di = amax / np.float32(127.0)
        d[i] = di
        total = 0
        if not di > 0:  # an all-zero row (or NaN input): codes stay 0
            for j in range(k):
                xq[i, j] = 0
            sums[i] = 0
            continue
        for j in range(k):
            q = min(127, max(-127, np.int32(np.rint(x[i, j] / di))))
            xq[i, j] = q
            total += q
        sums[i] = total


@njit(cache=True, inline="always")
def _dot_u8i8(crow, arow, k):
    # zero-extended bytes times sign-extended bytes summed in int32 (LLVM: vpdpwssd); each step
    # is cast back to int32 so numba's int64 promotion does not widen the vector lanes
    acc = np.int32(0)
    for j in range(k):
        acc = np.int32(acc + np.int32(crow[j]) * np.int32(arow[j]))
    return acc


@njit(cache=True, parallel=PARALLEL)
def gemv_w8a8(codes, scales, zeros, has_zeros, h2f, xq, d, asum, k, out):
    """out (rows,) = W @ x for per-row q8 codes (rows, ≥k) and one token's int8 codes xq (k,)."""
    rows = codes.shape[0]
    n_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(n_blocks):
        for r in range(b * ROW_BLOCK, min(rows, (b + 1) * ROW_BLOCK)):
            dot = _dot_u8i8(codes[r], xq, k)
            z = np.int32(zeros[r, 0]) if has_zeros else np.int32(128)
            out[r] = h2f[scales[r, 0]] * d * np.float32(dot - z * asum)


@njit(cache=True, inline="always")
def _dot_2x2(c0, c1, a0, a1, k):
    # two weight rows times two tokens: each loaded vector feeds two multiply-adds (measured
    # 147 GOP/s on one core against 103 for one row times one token, and 1.2x dequantize + BLAS)
    s00 = np.int32(0)
    s01 = np.int32(0)
    s10 = np.int32(0)
    s11 = np.int32(0)
    for j in range(k):
        w0 = np.int32(c0[j])
        w1 = np.int32(c1[j])
        x0 = np.int32(a0[j])
        x1 = np.int32(a1[j])
        s00 = np.int32(s00 + w0 * x0)
        s01 = np.int32(s01 + w0 * x1)
        s10 = np.int32(s10 + w1 * x0)
        s11 = np.int32(s11 + w1 * x1)
    return s00, s01, s10, s11


@njit(cache=True, inline="always")
def _finish(s, z, d_i, asum_i, dot):
    return s * d_i * np.float32(dot - z * asum_i)


@njit(cache=True, parallel=PARALLEL)
def gemm_w8a8(codes, scales, zeros, has_zeros, h2f, xq, d, asum, k, out):
    """out (n, rows) = x @ W.T for per-row q8 codes and n tokens' int8 codes xq (n, k).

    Parallel over pairs of weight rows; each pair meets the tokens two at a time (_dot_2x2);
    an odd last row or token takes the one-by-one dot product."""
    rows = codes.shape[0]
    n = xq.shape[0]
    n_pairs = (rows + 1) // 2
    for b in prange(n_pairs):
        r0 = 2 * b
        r1 = min(rows - 1, r0 + 1)  # an odd last row pairs with itself (computed twice, written once)
        c0 = codes[r0]
        c1 = codes[r1]
        s0 = h2f[scales[r0, 0]]
        s1 = h2f[scales[r1, 0]]
        z0 = np.int32(zeros[r0, 0]) if has_zeros else np.int32(128)
        z1 = np.int32(zeros[r1, 0]) if has_zeros else np.int32(128)
        for i in range(0, n - 1, 2):
            d00, d01, d10, d11 = _dot_2x2(c0, c1, xq[i], xq[i + 1], k)
            out[i, r0] = _finish(s0, z0, d[i], asum[i], d00)
            out[i + 1, r0] = _finish(s0, z0, d[i + 1], asum[i + 1], d01)
            out[i, r1] = _finish(s1, z1, d[i], asum[i], d10)
            out[i + 1, r1] = _finish(s1, z1, d[i + 1], asum[i + 1], d11)
        if n % 2:
            i = n - 1
            out[i, r0] = _finish(s0, z0, d[i], asum[i], _dot_u8i8(c0, xq[i], k))
            out[i, r1] = _finish(s1, z1, d[i], asum[i], _dot_u8i8(c1, xq[i], k))


# ---------------------------------------------------------------------------- AVX512-VNNI

_V16 = ir.VectorType(ir.IntType(32), 16)
_V64 = ir.VectorType(ir.IntType(8), 64)


def _vnni_codegen(n_rows, n_tokens):
    """LLVM IR of n_rows x n_tokens int32 dot products over `nblk` blocks of 64 bytes:
    vpdpbusd(acc, unsigned weight bytes, signed activation bytes) per block and pair."""
    def codegen(context, builder, signature, args):
        ptrs = [context.make_array(signature.args[i])(context, builder, args[i]).data
                for i in range(n_rows + n_tokens)]
        nblk = args[-1]
        vnni = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]),
                                              "llvm.x86.avx512.vpdpbusd.512")
        reduce_add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), [_V16]),
                                                    "llvm.vector.reduce.add.v16i32")
        accs = []
        for _ in range(n_rows * n_tokens):
            acc = cgutils.alloca_once(builder, _V16)
            builder.store(ir.Constant(_V16, [0] * 16), acc)
            accs.append(acc)

        def block(ptr, i):
            p = builder.gep(ptr, [builder.mul(i, ir.Constant(i.type, 64))])
            return builder.bitcast(builder.load(builder.bitcast(p, _V64.as_pointer()), align=1), _V16)

        with cgutils.for_range(builder, nblk) as loop:
            w = [block(p, loop.index) for p in ptrs[:n_rows]]
            a = [block(p, loop.index) for p in ptrs[n_rows:]]
            for r in range(n_rows):
                for t in range(n_tokens):
                    acc = accs[r * n_tokens + t]
                    builder.store(builder.call(vnni, [builder.load(acc), w[r], a[t]]), acc)
        sums = [builder.call(reduce_add, [builder.load(acc)]) for acc in accs]
        return context.make_tuple(builder, signature.return_type, sums)
    return codegen


@intrinsic
def _vnni_2x2(typingctx, c0, c1, a0, a1, nblk):
    """(c0·a0, c0·a1, c1·a0, c1·a1) over the first 64·nblk bytes: u8 rows c, s8 tokens a."""
    return types.UniTuple(types.int32, 4)(c0, c1, a0, a1, nblk), _vnni_codegen(2, 2)


@intrinsic
def _vnni_2x1(typingctx, c0, c1, a0, nblk):
    """(c0·a0, c1·a0) over the first 64·nblk bytes."""
    return types.UniTuple(types.int32, 2)(c0, c1, a0, nblk), _vnni_codegen(2, 1)


@njit(cache=True, inline="always")
def _tail_dot(crow, arow, j0, k):
    acc = np.int32(0)
    for j in range(j0, k):
        acc = np.int32(acc + np.int32(crow[j]) * np.int32(arow[j]))
    return acc


@njit(cache=True, parallel=PARALLEL)
def gemv_w8a8_vnni(codes, scales, zeros, has_zeros, h2f, xq, d, asum, k, out):
    """gemv_w8a8 through vpdpbusd (AVX512-VNNI CPUs only), two rows per step."""
    rows = codes.shape[0]
    nblk = k // 64
    j0 = nblk * 64
    n_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(n_blocks):
        r_end = min(rows, (b + 1) * ROW_BLOCK)
        for r0 in range(b * ROW_BLOCK, r_end, 2):
            r1 = min(r_end - 1, r0 + 1)  # an odd last row pairs with itself
            d0, d1 = _vnni_2x1(codes[r0], codes[r1], xq, nblk)
            d0 = np.int32(d0 + _tail_dot(codes[r0], xq, j0, k))
            d1 = np.int32(d1 + _tail_dot(codes[r1], xq, j0, k))
            z0 = np.int32(zeros[r0, 0]) if has_zeros else np.int32(128)
            z1 = np.int32(zeros[r1, 0]) if has_zeros else np.int32(128)
            out[r0] = h2f[scales[r0, 0]] * d * np.float32(d0 - z0 * asum)
            out[r1] = h2f[scales[r1, 0]] * d * np.float32(d1 - z1 * asum)


@njit(cache=True, parallel=PARALLEL)
def gemm_w8a8_vnni(codes, scales, zeros, has_zeros, h2f, xq, d, asum, k, out):
    """gemm_w8a8 through vpdpbusd (AVX512-VNNI CPUs only): 2 rows x 2 tokens per step."""
    rows = codes.shape[0]
    n = xq.shape[0]
    nblk = k // 64
    j0 = nblk * 64
    for b in prange((rows + 1) // 2):
        r0 = 2 * b
        r1 = min(rows - 1, r0 + 1)
        c0 = codes[r0]
        c1 = codes[r1]
        s0 = h2f[scales[r0, 0]]
        s1 = h2f[scales[r1, 0]]
        z0 = np.int32(zeros[r0, 0]) if has_zeros else np.int32(128)
        z1 = np.int32(zeros[r1, 0]) if has_zeros else np.int32(128)
        for i in range(0, n, 2):
            i1 = min(n - 1, i + 1)  # an odd last token pairs with itself
            d00, d01, d10, d11 = _vnni_2x2(c0, c1, xq[i], xq[i1], nblk)
            d00 = np.int32(d00 + _tail_dot(c0, xq[i], j0, k))
            d01 = np.int32(d01 + _tail_dot(c0, xq[i1], j0, k))
            d10 = np.int32(d10 + _tail_dot(c1, xq[i], j0, k))
            d11 = np.int32(d11 + _tail_dot(c1, xq[i1], j0, k))
            out[i, r0] = _finish(s0, z0, d[i], asum[i], d00)
            out[i1, r0] = _finish(s0, z0, d[i1], asum[i1], d01)
            out[i, r1] = _finish(s1, z1, d[i], asum[i], d10)
            out[i1, r1] = _finish(s1, z1, d[i1], asum[i1], d11)


# The kernels this CPU runs. Chosen once here, never by a branch inside compiled code: compiling
# the vpdpbusd intrinsic for a CPU without it is a fatal LLVM error, not an exception.
GEMV = gemv_w8a8_vnni if VNNI else gemv_w8a8
GEMM = gemm_w8a8_vnni if VNNI else gemm_w8a8


class W8A8Op(LinearBase):
    """A q8/q4/... weight whose inputs are quantized to int8 per token (tensor `activation`).

    x' = x / input_scale (when stored); the 16-bit columns (fp_cols) are zeroed in the int8
    part and added in float from x', as are sparse outliers. Per-channel q8 without n:m sparsity
    (what `--scheme w8a8` writes) runs the integer kernels above; any other layout multiplies
    the dequantized int8 activations through the kind's float kernels (same value, spec §6.5
    allows either). The reference is qformat.kernels.reference.linear_w8a8."""

    def __init__(self, t: Tensor):
        a = t.arrays
        k = t.shape[1]
        self.static = w8a8_static(t)
        check_width(k, t.name)
        super().__init__(t)
        dense_roles = ("codes", "scales", "zeros", "perm", "sparse_index")
        dense_op = GroupQuantOp if t.sparsity is None else SparseGroupQuantOp
        self.dense = dense_op(Tensor(t.name, t.kind, t.shape, {r: v for r, v in a.items() if r in dense_roles},
                                     t.group_size, t.symmetric, t.sparsity), float_activations=True)
        side_roles = ("outlier_rowptr", "outlier_cols", "outlier_values", "fp_cols", "fp_weight")
        self.side = Sidecars(Tensor(t.name, t.kind, t.shape, {r: v for r, v in a.items() if r in side_roles}))
        self.inv_scale = (np.float32(1.0) / np.asarray(a["input_scale"], np.float32)) if "input_scale" in a else None
        self.fp_cols = np.asarray(a["fp_cols"], np.int64) if "fp_cols" in a else None
        self.act_scale = np.float32(a["act_scale"][0]) if self.static else np.float32(0.0)
        self.perm = np.asarray(a["perm"], np.int64) if "perm" in a else None
        self.integer = t.kind == "q8" and t.sparsity is None and min(t.group_size, k) == k
        # prefill through the VNNI GEMM of gemm_vnni (q4/q8 without n:m): the same integers
        self.act_group = (gemm_vnni.act_group(t.kind, self.dense.group, k)
                          if VNNI and t.sparsity is None else None)
        self.codes = a["codes"]
        self.scales = a["scales"].view(np.uint16)
        self.has_zeros = "zeros" in a
        self.zeros = a["zeros"] if self.has_zeros else np.zeros((1, 1), np.uint8)
        self._gemv, self._gemm = GEMV, GEMM

    def _inputs(self, x: np.ndarray, gemm: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(x', the int8 part's input), both (n, k) float32; in stored column order where the
        integer kernels read it (else the dense op's float kernels gather it themselves)."""
        if self.inv_scale is not None:
            x = x * self.inv_scale
        xi = x
        if self.fp_cols is not None:
            xi = x.copy()
            xi[:, self.fp_cols] = 0.0
        if self.perm is not None and (self.integer or (gemm and self.act_group)):
            xi = xi[:, self.perm]
        return x, np.ascontiguousarray(xi, np.float32)

    def _quantize(self, xi: np.ndarray):
        n = xi.shape[0]
        xq = np.empty((n, self.in_features), np.int8)
        d = np.empty(n, np.float32)
        sums = np.empty(n, np.int32)
        quantize_tokens(xi, self.act_scale, self.static, xq, d, sums)
        return xq, d, sums

    def gemv(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        x1, xi = self._inputs(np.asarray(x, np.float32).reshape(1, -1), gemm=False)
        xq, d, sums = self._quantize(xi)
        if self.integer:
            self._gemv(self.codes, self.scales, self.zeros, self.has_zeros, H2F, xq[0], d[0], sums[0],
                       self.in_features, out)
        else:
            self.dense.gemv(xq[0].astype(np.float32) * d[0], out)
        if self.side.any:
            self.side.add_gemv(x1[0], out)
        return out

    def gemm(self, x: np.ndarray) -> np.ndarray:
        x1, xi = self._inputs(np.ascontiguousarray(x, np.float32))
        xq, d, sums = self._quantize(xi)
        if self.act_group:
            op = self.dense
            xg, dg, sg = gemm_vnni.per_token_input(xq, d, self.in_features, self.act_group)
            out = gemm_vnni.gemm_codes(op.codes, op.scales, op.zeros, op.has_zeros, H2F, op.bits, self.in_features,
                                       op.group, self.act_group, xg, dg, sg, xq.shape[0])
        elif self.integer:
            out = np.empty((x1.shape[0], self.out_features), np.float32)
            self._gemm(self.codes, self.scales, self.zeros, self.has_zeros, H2F, xq, d, sums, self.in_features, out)
        else:
            out = self.dense.gemm(xq.astype(np.float32) * d[:, None])
        if self.side.any:
            self.side.add_gemm(x1, out)
        return out

    def fused_row(self):
        """The fused step runs what `--scheme w8a8` writes: the integer kernels (per-channel q8
        rows), without input_scale; other W8A8 layouts take the per-operation path."""
        if not self.integer or self.inv_scale is not None:
            return None
        row, keep = grouped_row("w8a8", self.codes, self.scales, self.zeros if self.has_zeros else None,
                                self.in_features, self.in_features, 8)
        keep += Sidecars(self.tensor).fill_row(row)
        row[ACT] = 2 if self.static else 1
        if self.static:
            scale = np.asarray([self.act_scale], np.float32)
            row[ACT_SCALE] = scale.ctypes.data
            keep.append(scale)
        return row, keep
