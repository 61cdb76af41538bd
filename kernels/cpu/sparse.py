"""n:m structured-sparse grouped weights (spec §6.3) on the CPU, never densified per call.

A sparse row stores Kc = K·n/m kept values as a dense grouped tensor with groups of Gc = G·n/m
kept values (each group still spans G input columns), plus a 2-bit (m = 4) or 4-bit (m = 8)
position per kept value. The kernels read those bytes and no others.

q4 (decode, the speed case): the activations are quantized to int8 per G input columns exactly
as the dense 4-bit GEMV does (quant.quantize_x); once per call, every kept slot of every group
gets the m int8 activations of its block packed into one integer (`candidates`); the inner loop
picks the kept column's byte with one variable shift, multiplies by (code - zero) in integers and
scales once per group:  out = Σ_g s_g·d_g·Σ_e (q_e − z_g)·a[col(e)]. The weights are re-laid
at load in row tiles (same bytes, see "tile layout" below). Modelled exactly by
qformat.kernels.reference.gemv_nm_q8act_reference.

Other kinds (q8, q6, q5, q3, q2, nf4; float activations): per row, the kept columns' activations are
gathered into a kept-order buffer, then the dense kernels' per-group dot products (quant.dot*)
run on it. Their positions are re-packed at load with the codes' planar layout (planar_index).

Prefill (GEMM): a block of rows is dequantized once and scattered into float rows, then BLAS.

Memory: 4:8 with 4-bit positions stores 4 + 4 bits per two columns, exactly dense int4's bytes,
so only 2:4 (2 + 1 bits per column) can be faster than dense int4 by reading less.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from qformat.packing import pack_codes, padded_len
from qformat.schemes import KINDS, Tensor, unpack_nm_index

from . import nm_vnni, quant
from .base import (PARALLEL, CODE_BITS, CODE_BYTES, CODES, FAST, GROUP, H2F, HAS_ZEROS, IN, IS_NF4, N_GROUPS, N_TILES,
                   NF4_TABLE, NM_INDEX, NM_INDEX_BYTES, NM_M, NM_N, NM_TILE, ROWS, SCALES, ZEROS, LinearBase,
                   Sidecars, new_row)
from .features import VNNI_VBMI
from .quant import dot_bits, dot_nf4
from ..layouts import q8act

# Rows per parallel task (as quant.ROW_BLOCK: two threads split a 192-row projection evenly).
ROW_BLOCK = 32


def index_bits(m: int) -> int:
    """Bits per stored position: 2 for m = 4, 4 for m = 8 (spec §6.3)."""
    return 2 if m <= 4 else 4


def planar_index(t: Tensor) -> np.ndarray:
    """The positions of a sparse tensor re-packed in the codes' planar layout (see module doc):
    (rows, n_groups · Pc·bits/8) uint8."""
    n, m = t.sparsity
    rows, k = t.shape
    kc = k * n // m
    gc = min(t.group_size, k) * n // m
    pos = unpack_nm_index(np.asarray(t.arrays["sparse_index"]), kc, m)
    return pack_codes(pos, gc, index_bits(m))


# ---------------------------------------------------------------------------- q4, int8 activations
#
# Rows are processed TILE at a time with the vector lanes running over the rows of a tile, so no
# horizontal reduction is needed and a kept slot's m candidate activations are one scalar
# broadcast to every lane; each lane picks its row's byte with a variable shift. (Vectorizing
# along a row instead left 8-iteration loops per group for 2:4 int4-g64, which LLVM ran as
# scalar code: 5x slower than the dense kernel.)
#
# Load-time layout ("slot grid", the same bytes as the file up to group padding): the kept
# values of group g are numbered e = q*L + j (slot q of SLOTS, j < L, L = P/SLOTS for the
# group's own padded count P; the tail group is padded to the full L). SLOTS = 4 for m = 4 (2-bit
# positions) and 2 for m = 8 (4-bit positions), so one position byte holds the SLOTS slots of
# one j. m = 4: codes[tile, g, h*L + j, lane] = e(h, j) | e(h + 2, j) << 4 (h = 0, 1), positions
# [tile, g, j, lane]; m = 8: codes[tile, g, j, lane] = e(0, j) | e(1, j) << 4, positions alike.
# Every subscript is a loop variable or a constant: a computed offset makes numba's negative-index
# wraparound a per-lane select, which LLVM turns into scalar code and register spills.

# Rows per tile: measured on SmolLM2 shapes (2:4 int4-g64, one thread) against the dense q4
# kernel: 16 rows 0.95-1.0x, 32 rows 1.35-1.5x, 64 rows 1.4-1.55x (the per-slot loop overhead is
# shared by more lanes); 32 keeps two threads even on 192-row projections.
TILE = 32


def slots(m: int) -> int:
    """Kept-value slots per position byte: 4 (m = 4, 2-bit positions) or 2 (m = 8, 4-bit)."""
    return 4 if m <= 4 else 2


def tile_rows(a: np.ndarray) -> np.ndarray:
    """(rows, ...) -> (n_tiles, ..., TILE): element [b, ..., t] = a[b*TILE + t, ...]; padding rows 0."""
    rows = a.shape[0]
    n_tiles = -(-rows // TILE)
    padded = np.zeros((n_tiles * TILE,) + a.shape[1:], a.dtype)
    padded[:rows] = a
    tiled = padded.reshape((n_tiles, TILE) + a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(tiled, 1, -1))


def slot_grid(values: np.ndarray, k: int, group: int, n: int, m: int) -> np.ndarray:
    """(rows, Kc) per kept value -> (rows, n_groups, SLOTS, L): value e = q*L_g + j of group g at
    [g, q, j] (L_g = the group's padded count / SLOTS); 0 in the padding."""
    rows = values.shape[0]
    sl = slots(m)
    gc = group * n // m
    full_l = padded_len(gc) // sl
    n_groups = -(-k // group)
    out = np.zeros((rows, n_groups, sl, full_l), values.dtype)
    for g in range(n_groups):
        count = (min(k, (g + 1) * group) - g * group) * n // m
        lg = padded_len(count) // sl
        e = np.arange(count)
        out[:, g, e // lg, e % lg] = values[:, g * gc:g * gc + count]
    return out


def tiled_q4(t: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes, positions) of a sparse q4 tensor in the tile layout (see above)."""
    from qformat.packing import unpack_codes

    n, m = t.sparsity
    rows, k = t.shape
    group = min(t.group_size, k)
    kc, gc = k * n // m, group * n // m
    codes = slot_grid(unpack_codes(np.asarray(t.arrays["codes"]), kc, gc, 4), k, group, n, m)
    pos = slot_grid(unpack_nm_index(np.asarray(t.arrays["sparse_index"]), kc, m), k, group, n, m)
    if m <= 4:
        packed = np.concatenate([codes[:, :, 0] | codes[:, :, 2] << 4, codes[:, :, 1] | codes[:, :, 3] << 4], axis=2)
        index = pos[:, :, 0] | pos[:, :, 1] << 2 | pos[:, :, 2] << 4 | pos[:, :, 3] << 6
    else:
        packed = codes[:, :, 0] | codes[:, :, 1] << 4
        index = pos[:, :, 0] | pos[:, :, 1] << 4
    return tile_rows(packed.astype(np.uint8)), tile_rows(index.astype(np.uint8))


@njit(cache=True)
def candidates(xq, k, group, n, m):
    """xq (n_groups, P) int8 -> (n_groups, SLOTS, L) int64: for the kept value in slot (q, j) of
    group g, the m int8 activations of its block packed, byte c = block column c; 0 in the
    padding (so that padded codes meet zero)."""
    n_groups = xq.shape[0]
    sl = 4 if m <= 4 else 2
    full_l = (group * n // m + 7) // 8 * 8 // sl
    out = np.zeros((n_groups, sl, full_l), np.int64)
    for g in range(n_groups):
        count = (min(k, (g + 1) * group) - g * group) * n // m
        lg = (count + 7) // 8 * 8 // sl
        for e in range(count):
            base = (e // n) * m
            c = np.uint64(0)
            for q in range(m):
                c |= np.uint64(np.uint8(xq[g, base + q])) << np.uint64(8 * q)
            out[g, e // lg, e % lg] = np.int64(c)
    return out


@njit(cache=True, inline="always")
def _pick4(c, p):
    """Signed byte p (0..3) of the int32 c."""
    return np.int32(np.uint32(c) << np.uint32(24 - 8 * p)) >> np.int32(24)


@njit(cache=True, inline="always")
def _pick8(c, p):
    """Signed byte p (0..7) of the int64 c."""
    return np.int32(np.int64(np.uint64(c) << np.uint64(56 - 8 * p)) >> np.int64(56))


@njit(cache=True, fastmath=FAST)
def _tiles_n4(codes, scales, zeros, has_zeros, h2f, index, cand, d, b0, b1, out, iscratch, fscratch):
    """out rows of tiles b0..b1-1 = W @ x, n:4. codes (tiles, groups, 2L, TILE), index (tiles,
    groups, L, TILE), cand (groups, 4, L) int32 (byte c = block column c); scratch: (2, TILE)
    int32 and (TILE,) float32 of the caller's (see gemv_nm_q4_q8act)."""
    n_groups = codes.shape[1]
    ll = index.shape[2]
    rows = out.shape[0]
    dot = iscratch[0]
    acc = fscratch
    zz = iscratch[1]
    zz[:] = 8
    for b in range(b0, b1):
        acc[:] = 0.0
        for g in range(n_groups):
            cg = codes[b, g]
            ca = cg[:ll]
            cb = cg[ll:]
            ig = index[b, g]
            kg = cand[g]
            dot[:] = 0
            if has_zeros:
                for t in range(TILE):
                    zz[t] = np.int32(zeros[b, g, t])
            for j in range(ll):
                # slots 0, 1: low nibbles of ca, cb; slots 2, 3: their high nibbles
                k0 = kg[0, j]
                k1 = kg[1, j]
                k2 = kg[2, j]
                k3 = kg[3, j]
                for t in range(TILE):
                    ib = np.int32(ig[j, t])
                    c0 = np.int32(ca[j, t])
                    c1 = np.int32(cb[j, t])
                    z = zz[t]
                    v0 = _pick4(k0, ib & np.int32(3))
                    v1 = _pick4(k1, (ib >> np.int32(2)) & np.int32(3))
                    v2 = _pick4(k2, (ib >> np.int32(4)) & np.int32(3))
                    v3 = _pick4(k3, ib >> np.int32(6))
                    dot[t] = np.int32(dot[t] + ((c0 & np.int32(15)) - z) * v0 + ((c1 & np.int32(15)) - z) * v1
                                      + ((c0 >> np.int32(4)) - z) * v2 + ((c1 >> np.int32(4)) - z) * v3)
            dg = d[g]
            for t in range(TILE):
                acc[t] += h2f[scales[b, g, t]] * dg * np.float32(dot[t])
        for t in range(TILE):
            r = b * TILE + t
            if r < rows:
                out[r] = acc[t]


@njit(cache=True, fastmath=FAST)
def _tiles_n8(codes, scales, zeros, has_zeros, h2f, index, cand, d, b0, b1, out, iscratch, fscratch):
    """out rows of tiles b0..b1-1 = W @ x, n:8. codes and index (tiles, groups, L, TILE), cand
    (groups, 2, L) int64 (byte c = block column c); scratch as _tiles_n4."""
    n_groups = codes.shape[1]
    ll = codes.shape[2]
    rows = out.shape[0]
    dot = iscratch[0]
    acc = fscratch
    zz = iscratch[1]
    zz[:] = 8
    for b in range(b0, b1):
        acc[:] = 0.0
        for g in range(n_groups):
            cg = codes[b, g]
            ig = index[b, g]
            kg = cand[g]
            dot[:] = 0
            if has_zeros:
                for t in range(TILE):
                    zz[t] = np.int32(zeros[b, g, t])
            for j in range(ll):
                k0 = kg[0, j]
                k1 = kg[1, j]
                for t in range(TILE):
                    ib = np.int32(ig[j, t])
                    c = np.int32(cg[j, t])
                    z = zz[t]
                    v0 = _pick8(k0, ib & np.int32(15))
                    v1 = _pick8(k1, ib >> np.int32(4))
                    dot[t] = np.int32(dot[t] + ((c & np.int32(15)) - z) * v0 + ((c >> np.int32(4)) - z) * v1)
            dg = d[g]
            for t in range(TILE):
                acc[t] += h2f[scales[b, g, t]] * dg * np.float32(dot[t])
        for t in range(TILE):
            r = b * TILE + t
            if r < rows:
                out[r] = acc[t]


# Tiles per parallel task: one tile is 32 rows, as quant.ROW_BLOCK.
TILE_BLOCK = 1

# The n:4 tile kernel this CPU runs, chosen here and never by a branch in compiled code (see
# nm_vnni): bit-field and byte shuffles + vpdpbusd on AVX512-VNNI/BW/VBMI, else the portable
# shifts above.
NM4_VNNI = VNNI_VBMI and TILE == nm_vnni.TILE
TILES_N4 = nm_vnni.tiles_n4 if NM4_VNNI else _tiles_n4
# tested inside gemv_nm_q4_q8act; an int, as a global bool there failed LLVM IR parsing
NM4_TABLES = 1 if NM4_VNNI else 0


@njit(cache=True, parallel=PARALLEL)
def gemv_nm_q4_q8act(codes, scales, zeros, has_zeros, h2f, index, x, k, group, n, m, out):
    """out = W @ x for an n:m sparse q4 weight (m = 4 or 8) in the tile layout (tiled_q4's codes
    and positions, tile_rows of the scales' uint16 bits and of the zeros); x float32 (k,) in stored
    column order, quantized here to int8 per `group` input columns (quant.quantize_x)."""
    xq, d, _ = quant.quantize_x(x, k, group, (group + 7) // 8 * 8)
    if m == 4 and NM4_TABLES == 1:
        cand = np.zeros((1, 1, 1), np.int64)
        table = nm_vnni.step_table(xq, k, group, n)
    else:
        cand = candidates(xq, k, group, n, m)
        table = cand.astype(np.int32)  # m = 4: the 4 bytes fit (the upper half is zero)
    n_tiles = codes.shape[0]
    n_tasks = (n_tiles + TILE_BLOCK - 1) // TILE_BLOCK
    # every task's scratch allocated here: allocations inside the parallel loop made two threads
    # slower than one on SmolLM2's 192- and 576-row layers
    iscratch = np.empty((n_tasks, 2, TILE), np.int32)
    fscratch = np.empty((n_tasks, TILE), np.float32)
    for i in prange(n_tasks):
        b0 = i * TILE_BLOCK
        b1 = min(n_tiles, b0 + TILE_BLOCK)
        if m == 4:
            TILES_N4(codes, scales, zeros, has_zeros, h2f, index, table, d, b0, b1, out, iscratch[i], fscratch[i])
        else:
            _tiles_n8(codes, scales, zeros, has_zeros, h2f, index, cand, d, b0, b1, out, iscratch[i], fscratch[i])


@njit(cache=True, parallel=PARALLEL)
def dequant_tiles_q4(codes, scales, zeros, has_zeros, h2f, index, k, group, n, m, ids, out):
    """out (len(ids), k) float32: dense rows `ids` (stored column order, pruned columns zero) of
    an n:m sparse q4 weight in the tile layout (the prefill path)."""
    n_groups = (k + group - 1) // group
    sl = 4 if m <= 4 else 2
    full_l = (group * n // m + 7) // 8 * 8 // sl
    ib = 2 if m <= 4 else 4
    for i in prange(ids.size):
        b = ids[i] // TILE
        t = ids[i] % TILE
        orow = out[i]
        orow[:] = 0.0
        for g in range(n_groups):
            count = (min(k, (g + 1) * group) - g * group) * n // m
            lg = (count + 7) // 8 * 8 // sl
            s = h2f[scales[b, g, t]]
            z = np.float32(zeros[b, g, t]) if has_zeros else np.float32(8.0)
            for e in range(count):
                q = e // lg
                j = e % lg
                if sl == 4:  # slot q: byte half q % 2, nibble q // 2
                    c = np.int32(codes[b, g, (q % 2) * full_l + j, t]) >> np.int32(4 * (q // 2))
                else:
                    c = np.int32(codes[b, g, j, t]) >> np.int32(4 * q)
                p = (np.int32(index[b, g, j, t]) >> np.int32(ib * q)) & np.int32((1 << ib) - 1)
                orow[g * group + (e // n) * m + p] = s * (np.float32(c & np.int32(15)) - z)


# ---------------------------------------------------------------------------- any kind, float x


@njit(cache=True, inline="always")
def _planar_field(row, base, plen, bits, e):
    """Field e of a planar-packed group starting at byte `base` (plen padded fields of `bits`)."""
    sl = plen * bits // 8
    return (np.int32(row[base + e % sl]) >> np.int32(bits * (e // sl))) & np.int32((1 << bits) - 1)


@njit(cache=True, fastmath=FAST)
def _gather_row(irow, x, k, group, n, m, pc, xk, xs):
    """xk (n_groups, pc) = the activations of one row's kept columns, in kept order (0 in the
    padding); xs (n_groups,) their per-group sums."""
    n_groups = xk.shape[0]
    ib = 2 if m <= 4 else 4
    for g in range(n_groups):
        glen = min(k, (g + 1) * group) - g * group
        gc = glen * n // m
        plen = (gc + 7) // 8 * 8
        s = np.float32(0.0)
        for e in range(gc):
            p = _planar_field(irow, g * pc * ib // 8, plen, ib, e)
            v = x[g * group + (e // n) * m + p]
            xk[g, e] = v
            s += v
        xs[g] = s


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemv_nm(bits, nf4, codes, scales, zeros, has_zeros, h2f, index, x, k, group, n, m, out):
    """out = W @ x for an n:m sparse grouped weight of any kind (bits 8/6/5/4/3/2, nf4), float x (k,)
    in stored column order. `index`: planar_index's layout."""
    rows, n_groups = scales.shape
    gc_full = group * n // m
    pc = (gc_full + 7) // 8 * 8
    gbytes = pc * bits // 8
    n_full = k // group
    tail_pc = ((k - n_full * group) * n // m + 7) // 8 * 8
    mid = np.float32(1 << (bits - 1))
    n_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(n_blocks):
        xk = np.zeros((n_groups, pc), np.float32)
        xs = np.zeros(n_groups, np.float32)
        for r in range(b * ROW_BLOCK, min(rows, (b + 1) * ROW_BLOCK)):
            _gather_row(index[r], x, k, group, n, m, pc, xk, xs)
            crow = codes[r]
            acc = np.float32(0.0)
            for g in range(n_groups):
                plen = pc if g < n_full else tail_pc
                cg = crow[g * gbytes:g * gbytes + plen * bits // 8]
                if nf4:
                    acc += h2f[scales[r, g]] * dot_nf4(cg, xk[g], plen, NF4_TABLE)
                    continue
                dt = dot_bits(cg, xk[g], plen, bits)
                z = np.float32(zeros[r, g]) if has_zeros else mid
                acc += h2f[scales[r, g]] * (dt - z * xs[g])
            out[r] = acc


# ---------------------------------------------------------------------------- prefill


@njit(cache=True, parallel=PARALLEL)
def scatter_rows(vals, index, k, group, n, m, ids, out):
    """vals (len(ids), n_groups * Pc) dequantized kept values in the padded compressed layout ->
    out (len(ids), k) float32 dense rows (zeros where pruned)."""
    n_groups = (k + group - 1) // group
    pc = (group * n // m + 7) // 8 * 8
    ib = 2 if m <= 4 else 4
    for i in prange(ids.size):
        irow = index[ids[i]]
        orow = out[i]
        orow[:] = 0.0
        for g in range(n_groups):
            glen = min(k, (g + 1) * group) - g * group
            gc = glen * n // m
            plen = (gc + 7) // 8 * 8
            for e in range(gc):
                p = _planar_field(irow, g * pc * ib // 8, plen, ib, e)
                orow[g * group + (e // n) * m + p] = vals[i, g * pc + e]


class NmLayout:
    """A sparse tensor prepared for the kernels. q4: codes, positions, scales and zeros in the
    tile layout (copies, the same bytes as the file's); other kinds: codes, scales and zeros are
    views of the file and the positions are re-packed planar (planar_index)."""

    def __init__(self, t: Tensor, float_activations: bool = False):
        if t.sparsity is None:
            raise ValueError(f"tensor {t.name}: not n:m sparse")
        n, m = t.sparsity
        if m not in (4, 8) or not 0 < n < m:
            raise NotImplementedError(f"tensor {t.name}: {n}:{m} sparsity has no CPU kernel (n:4 and n:8 do)")
        kind = KINDS[t.kind]
        a = t.arrays
        self.n, self.m = n, m
        self.rows, self.k = t.shape
        self.group = min(t.group_size, self.k)
        self.kept_group = self.group * n // m
        self.padded = padded_len(self.kept_group)
        self.bits = kind.bits
        self.nf4 = kind.nf4
        self.has_zeros = "zeros" in a
        self.tiled = q8act(t.kind, self.group, sparse=True) and not float_activations  # the tile layout
        codes = np.asarray(a["codes"])
        scales = np.asarray(a["scales"]).view(np.uint16)
        if self.tiled:
            self.codes, self.index = tiled_q4(t)
            self.scales = tile_rows(scales)
            self.zeros = tile_rows(np.asarray(a["zeros"])) if self.has_zeros else np.zeros((1, 1, 1), np.uint8)
        else:
            self.codes = np.ascontiguousarray(codes)
            self.scales = np.ascontiguousarray(scales)
            self.index = planar_index(t)
            self.zeros = np.ascontiguousarray(a["zeros"]) if self.has_zeros else np.zeros((1, 1), np.uint8)

    def gemv(self, h2f: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out = W @ x, x float32 (k,) in stored column order."""
        if self.tiled:
            gemv_nm_q4_q8act(self.codes, self.scales, self.zeros, self.has_zeros, h2f, self.index, x,
                             self.k, self.group, self.n, self.m, out)
        else:
            gemv_nm(self.bits, self.nf4, self.codes, self.scales, self.zeros, self.has_zeros, h2f,
                    self.index, x, self.k, self.group, self.n, self.m, out)

    def dense_rows(self, h2f: np.ndarray, dequant, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), k) rows in stored column order, pruned columns zero; `dequant` is
        the kind's dense row dequantizer (quant.dequant_*)."""
        out = np.empty((ids.size, self.k), np.float32)
        if self.tiled:
            dequant_tiles_q4(self.codes, self.scales, self.zeros, self.has_zeros, h2f, self.index, self.k,
                             self.group, self.n, self.m, ids, out)
            return out
        vals = np.zeros((ids.size, self.scales.shape[1] * self.padded), np.float32)
        dequant(self.codes, self.scales, self.zeros, self.has_zeros, h2f, self.k * self.n // self.m,
                self.kept_group, ids, vals)
        scatter_rows(vals, self.index, self.k, self.group, self.n, self.m, ids, out)
        return out


class SparseGroupQuantOp(LinearBase):
    """The linear op (qformat.kernels.registry.LinearOp) of an n:m sparse grouped weight: GEMV on
    the sparse kernels, prefill (LinearBase.gemm) on blocks of rows dequantized and scattered
    once per block, then BLAS. float_activations: as GroupQuantOp's."""

    def __init__(self, t: Tensor, float_activations: bool = False):
        super().__init__(t)
        if t.activation is not None:
            raise ValueError(f"tensor {t.name}: W8A8; its op is kernels.cpu.int8.W8A8Op")
        self.nm = NmLayout(t, float_activations)
        self.side = Sidecars(t)
        self._dequant = quant.DEQUANT[t.kind]

    def gemv(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        xs = np.ascontiguousarray(self.side.stored_x(x), np.float32)
        self.nm.gemv(H2F, xs, out)
        if self.side.any:
            self.side.add_gemv(x, out)
        return out

    def prepare_x(self, x: np.ndarray) -> np.ndarray:
        return self.side.stored_x(x)

    def weight_block(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows `ids` in stored column order (pruned columns zero), sidecars not added."""
        return self.nm.dense_rows(H2F, self._dequant, ids)

    def add_gemm(self, x: np.ndarray, out: np.ndarray) -> None:
        if self.side.any:
            self.side.add_gemm(x, out)

    def fused_row(self):
        nm = self.nm
        per_row = -2 if nm.tiled else 1  # the axis of bytes per row (per tile row when tiled)
        row = new_row("n:m-q4-q8act" if nm.tiled else "n:m")
        row[HAS_ZEROS], row[GROUP], row[IN], row[ROWS] = int(nm.has_zeros), nm.group, nm.k, nm.rows
        row[CODES], row[CODE_BYTES] = nm.codes.ctypes.data, nm.codes.shape[per_row]
        row[SCALES], row[N_GROUPS] = nm.scales.ctypes.data, nm.scales.shape[per_row]
        row[ZEROS] = nm.zeros.ctypes.data if nm.has_zeros else 0
        row[NM_N], row[NM_M] = nm.n, nm.m
        row[NM_INDEX], row[NM_INDEX_BYTES] = nm.index.ctypes.data, nm.index.shape[per_row]
        row[N_TILES], row[NM_TILE] = (nm.codes.shape[0], nm.codes.shape[-1]) if nm.tiled else (0, 0)
        row[CODE_BITS], row[IS_NF4] = nm.bits, int(nm.nf4)
        return row, [nm.codes, nm.scales, nm.zeros, nm.index] + self.side.fill_row(row)
