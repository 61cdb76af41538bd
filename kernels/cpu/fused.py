"""A whole decode step (every layer, then the head) in one compiled call.

Calling the per-operation kernels from Python costs a few microseconds each; a 30-layer model
makes ~20 of them per layer, which measured 4.5 ms per token of pure overhead on SmolLM2's shape,
half of llama.cpp's whole time per token. Here the step runs in Numba end to end, and each linear layer dispatches on a small integer kind code to the same GEMV kernels the per-op path
uses (so both paths compute the same numbers).

The weights reach the compiled step as a table of addresses into the memory map (a typed list
of arrays costs ~1 s of compilation at every start, a tuple of 211 arrays ~100 us per call;
an int64 table costs nothing). The FusedDecoder keeps every array alive while it exists. Norm
weights, biases and q/k norms are small and are gathered into three stacked float32 arrays.

Sidecars run here too: a permutation gathers x once per linear layer (spec §6.1), sparse outliers
(§6.2) and 16-bit columns (§6.4) are added after the GEMV from the unpermuted x, and n:m sparse
weights (§6.3) dispatch to kernels/cpu/sparse.py. Per-channel q8 weights with 8-bit activations
(W8A8, §6.5) run the integer GEMV of kernels/cpu/int8.py; other W8A8 layouts and input_scale
are not handled here: `build` returns None and the model uses the per-operation path.
"""
from __future__ import annotations

import math

import numpy as np
from numba import carray, njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from qformat.schemes import Tensor

from . import dense, int8, ops, quant, sparse
from .linear import H2F

KIND_CODES = {"f32": 0, "f16": 1, "bf16": 2, "q8": 3, "q4": 4, "q3": 5, "q2": 6, "nf4": 7}
# Sidecars the fused step does not run (the model then takes the per-operation path).
UNSUPPORTED_SIDECARS = ("input_scale",)


# Columns of the weight table: one row per linear layer. Sidecar columns hold 0 when absent.
KIND, HAS_ZEROS, GROUP, IN, ROWS, CODES, CODE_BYTES, SCALES, N_GROUPS, ZEROS = range(10)
PERM, OUT_PTR, OUT_COLS, OUT_VALS, FP_COLS, FP_W, N_FP = range(10, 17)  # spec §6.1, §6.2, §6.4
# n:m sparsity (§6.3): n, m, planar positions and their bytes per row (or per tile row), and the
# number of row tiles of the q4 tile layout (sparse.tile_rows; 0: rows are not tiled)
NM_N, NM_M, NM_INDEX, NM_INDEX_BYTES, N_TILES = range(17, 22)
# W8A8 (§6.5): ACT 1 dynamic / 2 static int8 activations (0: float), ACT_SCALE the static
# scale's address (an f32 array of 1)
ACT, ACT_SCALE = range(22, 24)
# rows per tile of the q4 tile layout, from the layout itself: numba's on-disk cache of this file
# would not notice a change of sparse.TILE
NM_TILE = 24
WIDTH = 25


@intrinsic
def _address(typingctx, addr):
    """An integer address as a void pointer, for numba.carray."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.intp), codegen


def linear_entry(t: Tensor):
    """(table row, arrays to keep alive) of a tensor, or None if the fused step cannot run it."""
    if t.kind not in KIND_CODES or len(t.shape) != 2 or any(s in t.arrays for s in UNSUPPORTED_SIDECARS):
        return None
    if t.activation is not None and not fusable_w8a8(t):
        return None
    rows, k = t.shape
    code = KIND_CODES[t.kind]
    row = [0] * WIDTH
    if code <= 2:
        data = np.ascontiguousarray(t.arrays["data"])
        row[:7] = [code, 0, k, k, rows, data.ctypes.data, data.nbytes // max(rows, 1)]
        keep = [data]
    elif t.sparsity is not None:
        try:
            nm = sparse.NmLayout(t)
        except NotImplementedError:
            return None
        row[:10] = [code, int(nm.has_zeros), nm.group, k, rows, nm.codes.ctypes.data, nm.codes.shape[-2 if nm.tiled else 1],
                    nm.scales.ctypes.data, nm.scales.shape[-2 if nm.tiled else 1], nm.zeros.ctypes.data if nm.has_zeros else 0]
        row[NM_N:N_TILES + 1] = [nm.n, nm.m, nm.index.ctypes.data, nm.index.shape[-2 if nm.tiled else 1],
                      nm.codes.shape[0] if nm.tiled else 0]
        row[NM_TILE] = nm.codes.shape[-1] if nm.tiled else 0
        keep = [nm, nm.codes, nm.scales, nm.zeros, nm.index]
    else:
        codes = np.ascontiguousarray(t.arrays["codes"])
        scales = np.ascontiguousarray(t.arrays["scales"])
        zeros = np.ascontiguousarray(t.arrays["zeros"]) if "zeros" in t.arrays else None
        row[:10] = [code, int(zeros is not None), min(t.group_size, k), k, rows, codes.ctypes.data, codes.shape[1],
                    scales.ctypes.data, scales.shape[1], zeros.ctypes.data if zeros is not None else 0]
        keep = [codes, scales, zeros]
    keep += _sidecar_columns(t, row)
    if t.activation is not None:
        row[ACT] = 2 if t.activation["mode"] == "static" else 1
        if row[ACT] == 2:
            scale = np.ascontiguousarray(t.arrays["act_scale"], np.float32)
            row[ACT_SCALE] = scale.ctypes.data
            keep.append(scale)
    return row, tuple(keep)


def _sidecar_columns(t: Tensor, row: list) -> list:
    """Fill the sidecar columns of `row`; returns the (converted) arrays they point into."""
    a = t.arrays
    keep = []

    def put(col, arr):
        keep.append(arr)
        row[col] = arr.ctypes.data

    if "perm" in a:
        put(PERM, np.ascontiguousarray(a["perm"], np.int32))
    if "outlier_rowptr" in a:
        put(OUT_PTR, np.ascontiguousarray(a["outlier_rowptr"], np.int32))
        # an empty array still has a valid (1-element) allocation behind it
        put(OUT_COLS, np.ascontiguousarray(a["outlier_cols"], np.int32).reshape(-1).copy() if a["outlier_cols"].size
            else np.zeros(1, np.int32))
        put(OUT_VALS, np.ascontiguousarray(a["outlier_values"], np.float32).reshape(-1).copy() if a["outlier_values"].size
            else np.zeros(1, np.float32))
    if "fp_cols" in a and a["fp_cols"].size:
        put(FP_COLS, np.ascontiguousarray(a["fp_cols"], np.int32))
        put(FP_W, np.ascontiguousarray(a["fp_weight"], np.float32))
        row[N_FP] = int(a["fp_cols"].size)
    return keep


@njit(cache=True)
def _gemv_sparse(table, i, h2f, x, out):
    """out = W_i @ x for an n:m sparse weight (x in stored column order)."""
    kind = table[i, KIND]
    rows = table[i, ROWS]
    k = table[i, IN]
    group = table[i, GROUP]
    n_groups = table[i, N_GROUPS]
    nbytes = table[i, CODE_BYTES]
    ibytes = table[i, NM_INDEX_BYTES]
    has_zeros = table[i, HAS_ZEROS] != 0
    n, m = table[i, NM_N], table[i, NM_M]
    tiles = table[i, N_TILES]
    lanes = table[i, NM_TILE]
    if tiles:  # q4: tile layout, int8 activations
        codes = carray(_address(table[i, CODES]), (tiles, n_groups, nbytes, lanes), np.uint8)
        scales = carray(_address(table[i, SCALES]), (tiles, n_groups, lanes), np.uint16)
        zeros = carray(_address(table[i, ZEROS] if has_zeros else table[i, CODES]),
                       (tiles, n_groups, lanes) if has_zeros else (1, 1, 1), np.uint8)
        index = carray(_address(table[i, NM_INDEX]), (tiles, n_groups, ibytes, lanes), np.uint8)
        sparse.gemv_nm_q4_q8act(codes, scales, zeros, has_zeros, h2f, index, x, k, group, n, m, out)
        return
    codes = carray(_address(table[i, CODES]), (rows, nbytes), np.uint8)
    scales = carray(_address(table[i, SCALES]), (rows, n_groups), np.uint16)
    zeros = carray(_address(table[i, ZEROS] if has_zeros else table[i, CODES]),
                   (rows, n_groups) if has_zeros else (1, 1), np.uint8)
    index = carray(_address(table[i, NM_INDEX]), (rows, ibytes), np.uint8)
    bits = 8 if kind == 3 else 4 if kind == 4 or kind == 7 else 3 if kind == 5 else 2
    sparse.gemv_nm(bits, kind == 7, codes, scales, zeros, has_zeros, h2f, index, x, k, group, n, m, out)


@njit(cache=True)
def _add_sidecars(table, i, x, out):
    """out += sparse outliers · x and 16-bit columns · x (x in the original channel order)."""
    rows = table[i, ROWS]
    if table[i, OUT_PTR] != 0:
        ptr = carray(_address(table[i, OUT_PTR]), (rows + 1,), np.int32)
        nnz = max(1, ptr[rows])
        cols = carray(_address(table[i, OUT_COLS]), (nnz,), np.int32)
        vals = carray(_address(table[i, OUT_VALS]), (nnz,), np.float32)
        for r in range(rows):
            acc = np.float32(0.0)
            for e in range(ptr[r], ptr[r + 1]):
                acc += vals[e] * x[cols[e]]
            out[r] += acc
    n_fp = table[i, N_FP]
    if n_fp:
        cols = carray(_address(table[i, FP_COLS]), (n_fp,), np.int32)
        w = carray(_address(table[i, FP_W]), (rows, n_fp), np.float32)
        for r in range(rows):
            acc = np.float32(0.0)
            for c in range(n_fp):
                acc += w[r, c] * x[cols[c]]
            out[r] += acc


def fusable_w8a8(t: Tensor) -> bool:
    """Whether the fused step runs this W8A8 tensor: per-channel q8, dense, 8-bit dynamic or static."""
    a = t.activation
    return (t.kind == "q8" and t.sparsity is None and min(t.group_size, t.shape[1]) == t.shape[1]
            and a.get("bits") == 8 and a.get("mode") in ("dynamic", "static")
            and t.shape[1] <= int8.MAX_COLUMNS)


@njit(cache=True)
def _gemv_w8a8(table, i, h2f, x, out):
    """out = W_i @ x on int8 activations (W8A8): 16-bit columns zeroed, then stored column order,
    then per-token (or static) int8 codes and the integer GEMV, as int8.W8A8Op.gemv."""
    k = table[i, IN]
    rows = table[i, ROWS]
    xz = x.copy()
    n_fp = table[i, N_FP]
    if n_fp:
        cols = carray(_address(table[i, FP_COLS]), (n_fp,), np.int32)
        for c in range(n_fp):
            xz[cols[c]] = 0.0
    xi = np.empty((1, k), np.float32)
    if table[i, PERM] != 0:
        perm = carray(_address(table[i, PERM]), (k,), np.int32)
        for j in range(k):
            xi[0, j] = xz[perm[j]]
    else:
        xi[0] = xz
    static = table[i, ACT] == 2
    scale = carray(_address(table[i, ACT_SCALE]), (1,), np.float32)[0] if static else np.float32(0.0)
    xq = np.empty((1, k), np.int8)
    d = np.empty(1, np.float32)
    sums = np.empty(1, np.int32)
    int8.quantize_tokens(xi, scale, static, xq, d, sums)
    codes = carray(_address(table[i, CODES]), (rows, table[i, CODE_BYTES]), np.uint8)
    scales = carray(_address(table[i, SCALES]), (rows, 1), np.uint16)
    has_zeros = table[i, HAS_ZEROS] != 0
    zeros = carray(_address(table[i, ZEROS] if has_zeros else table[i, CODES]), (rows, 1) if has_zeros else (1, 1),
                   np.uint8)
    int8.GEMV(codes, scales, zeros, has_zeros, h2f, xq[0], d[0], sums[0], k, out)


@njit(cache=True)
def gemv_row(table, i, h2f, x, out):
    """out = W_i @ x for the weight in row i of the table, sidecars included."""
    if table[i, ACT] != 0:  # int8 activations (W8A8): gathers and zeroes on its own
        _gemv_w8a8(table, i, h2f, x, out)
        if table[i, OUT_PTR] != 0 or table[i, N_FP] != 0:
            _add_sidecars(table, i, x, out)
        return
    xz = x
    n_fp = table[i, N_FP]
    if n_fp:  # the dense part's input has the 16-bit columns zeroed, as linear._Sidecars.stored_x
        xz = x.copy()
        cols = carray(_address(table[i, FP_COLS]), (n_fp,), np.int32)
        for c in range(n_fp):
            xz[cols[c]] = 0.0
    if table[i, PERM] != 0:  # act-order: gather x once into stored column order (spec §6.1)
        k = table[i, IN]
        perm = carray(_address(table[i, PERM]), (k,), np.int32)
        xs = np.empty(k, np.float32)
        for j in range(k):
            xs[j] = xz[perm[j]]
        _gemv_stored(table, i, h2f, xs, out)
    else:
        _gemv_stored(table, i, h2f, xz, out)
    if table[i, OUT_PTR] != 0 or table[i, N_FP] != 0:
        _add_sidecars(table, i, x, out)


@njit(cache=True)
def _gemv_stored(table, i, h2f, x, out):
    """out = W_i @ x without sidecars, x in stored column order."""
    if table[i, NM_M] != 0:
        _gemv_sparse(table, i, h2f, x, out)
        return
    _gemv_dense(table, i, h2f, x, out)


@njit(cache=True)
def _gemv_dense(table, i, h2f, x, out):
    """out = W_i @ x for a dense (not n:m) weight in row i of the table (any kind, see KIND_CODES)."""
    kind = table[i, KIND]
    rows = table[i, ROWS]
    nbytes = table[i, CODE_BYTES]
    codes = carray(_address(table[i, CODES]), (rows, nbytes), np.uint8)
    if kind == 0:
        dense.gemv_f32(codes.view(np.float32), x, out)
    elif kind == 1:
        dense.gemv_f16(codes.view(np.uint16), x, out)
    elif kind == 2:
        dense.gemv_bf16(codes.view(np.uint16), x, out)
    else:
        k = table[i, IN]
        group = table[i, GROUP]
        n_groups = table[i, N_GROUPS]
        scales = carray(_address(table[i, SCALES]), (rows, n_groups), np.uint16)
        has_zeros = table[i, HAS_ZEROS] != 0
        # without zeros the kernels never read this array; any valid address will do
        zeros = carray(_address(table[i, ZEROS] if has_zeros else table[i, CODES]),
                       (rows, n_groups) if has_zeros else (1, 1), np.uint8)
        padded = (group + 7) // 8 * 8
        if kind == 4 and group % 8 == 0:  # int8 activations, as GroupQuantOp.gemv (linear.q8act)
            xq, d, sums = quant.quantize_x(x, k, group, padded)
            quant.gemv_q4_q8act(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, out)
            return
        xp, xs = quant.pad_x(x, k, group, padded)
        if kind == 3:
            quant.gemv_q8(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out)
        elif kind == 4:
            quant.gemv_q4(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out)
        elif kind == 5:
            quant.gemv_q3(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out)
        elif kind == 6:
            quant.gemv_q2(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out)
        else:
            quant.gemv_nf4(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out)


@njit(cache=True)
def _linear(table, i, h2f, x):
    out = np.empty(table[i, ROWS], np.float32)
    gemv_row(table, i, h2f, x, out)
    return out


@njit(cache=True)
def decode_step(x, pos, table, norms, biases, qk_norms, k_cache, v_cache, cos, sin,
                n_heads, n_kv, head_dim, eps, window, h2f, logits):
    """Run one token through every layer and the head.

    x (dim,) embedding of the token (updated in place as the residual stream); pos its position;
    table (n_linears, WIDTH) int64: weight table rows 7*layer + j for wq wk wv wo w1 w3 w2, then the
    head; norms (2*n_layers + 1, dim): attn_norm, ffn_norm per layer, then the final norm;
    biases (3*n_layers, n_heads*head_dim): bq bk bv per layer, zero-padded, or shape (0, 0);
    qk_norms (2*n_layers, head_dim) or (0, 0); k_cache, v_cache (n_layers, max_seq, n_kv_heads,
    head_dim); cos, sin (max_seq, head_dim/2); window: sliding window (0: none). Writes logits.
    """
    n_layers = k_cache.shape[0]
    dim = x.shape[0]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    xn = np.empty((1, dim), np.float32)
    att = np.empty((n_heads, head_dim), np.float32)
    start = 0 if window == 0 else max(0, pos + 1 - window)
    c1 = cos[pos:pos + 1]
    s1 = sin[pos:pos + 1]
    q_dim = n_heads * head_dim
    kv_dim = n_kv * head_dim
    for layer in range(n_layers):
        base = layer * 7
        ops.rmsnorm(x.reshape(1, dim), norms[2 * layer], eps, xn)
        q = _linear(table, base + 0, h2f, xn[0])
        k = _linear(table, base + 1, h2f, xn[0])
        v = _linear(table, base + 2, h2f, xn[0])
        if biases.shape[0]:
            q += biases[3 * layer, :q_dim]
            k += biases[3 * layer + 1, :kv_dim]
            v += biases[3 * layer + 2, :kv_dim]
        if qk_norms.shape[0]:
            q2 = q.reshape(n_heads, head_dim)
            ops.rmsnorm(q2.copy(), qk_norms[2 * layer], eps, q2)
            k2 = k.reshape(n_kv, head_dim)
            ops.rmsnorm(k2.copy(), qk_norms[2 * layer + 1], eps, k2)
        q3 = q.reshape(1, n_heads, head_dim)
        k3 = k.reshape(1, n_kv, head_dim)
        ops.rope(q3, c1, s1)
        ops.rope(k3, c1, s1)
        k_cache[layer, pos] = k3[0]
        v_cache[layer, pos] = v.reshape(n_kv, head_dim)
        ops.attention_decode(q3[0], k_cache[layer], v_cache[layer], start, pos + 1, scale, att)
        x += _linear(table, base + 3, h2f, att.reshape(q_dim))
        ops.rmsnorm(x.reshape(1, dim), norms[2 * layer + 1], eps, xn)
        gate = _linear(table, base + 4, h2f, xn[0])
        up = _linear(table, base + 5, h2f, xn[0])
        ops.silu_mul(gate.reshape(1, -1), up.reshape(1, -1))
        x += _linear(table, base + 6, h2f, gate)
    ops.rmsnorm(x.reshape(1, dim), norms[2 * n_layers], eps, xn)
    gemv_row(table, n_layers * 7, h2f, xn[0], logits)


class FusedDecoder:
    """The weight table of a model and its small stacked parameters; call with (embedding, pos)."""

    def __init__(self, rows, keep, norms, biases, qk_norms, args, cache, cos, sin):
        self.table = np.asarray(rows, np.int64)  # (n_linears, WIDTH)
        self._keep = keep  # the arrays whose addresses are in the table
        self.norms = np.ascontiguousarray(np.stack(norms), np.float32)  # (2*n_layers + 1, dim)
        self.biases = biases  # (3*n_layers, n_heads*head_dim) or (0, 0)
        self.qk_norms = qk_norms  # (2*n_layers, head_dim) or (0, 0)
        self.args = args
        self.cache = cache
        self.cos, self.sin = cos, sin
        self.vocab = int(self.table[-1, ROWS])
        self.eps = np.float32(args.norm_eps)
        self.window = args.sliding_window or 0

    def __call__(self, x: np.ndarray, pos: int) -> np.ndarray:
        a = self.args
        logits = np.empty(self.vocab, np.float32)
        decode_step(np.ascontiguousarray(x, np.float32), pos, self.table, self.norms, self.biases,
                    self.qk_norms, self.cache.k, self.cache.v, self.cos, self.sin,
                    a.n_heads, a.n_kv_heads, a.head_dim, self.eps, self.window, H2F, logits)
        return logits


def build(reader, args, cache, cos, sin, linears: dict | None = None) -> FusedDecoder | None:
    """A FusedDecoder over the file's tensors (read in place: `linears`, the model's ops, are not
    needed), or None if some tensor needs the per-op path."""
    names = []
    for i in range(args.n_layers):
        names += [f"layers.{i}.attn.{w}" for w in ("wq", "wk", "wv", "wo")]
        names += [f"layers.{i}.ffn.{w}" for w in ("w1", "w3", "w2")]
    names.append("output" if "output" in reader else "tok_embeddings")
    entries = [linear_entry(reader[n]) for n in names]
    if any(e is None for e in entries):
        return None
    rows, keep = zip(*entries)

    def data(name):
        return np.asarray(reader[name].arrays["data"], np.float32)

    norms = [data(f"layers.{i}.{w}") for i in range(args.n_layers) for w in ("attn_norm", "ffn_norm")]
    norms.append(data("norm"))
    biases = np.zeros((0, 0), np.float32)
    if args.qkv_bias:
        biases = np.zeros((3 * args.n_layers, args.n_heads * args.head_dim), np.float32)
        for i in range(args.n_layers):
            for j, b in enumerate(("bq", "bk", "bv")):
                v = data(f"layers.{i}.attn.{b}")
                biases[3 * i + j, :v.size] = v
    qk = np.zeros((0, 0), np.float32)
    if args.qk_norm:
        qk = np.stack([data(f"layers.{i}.attn.{b}") for i in range(args.n_layers) for b in ("q_norm", "k_norm")])
    return FusedDecoder(rows, keep, norms, biases, np.ascontiguousarray(qk, np.float32), args, cache, cos, sin)
