"""What every CPU linear op shares: numba flags and tables, the op base class, the sidecars of
spec §6.1/6.2/6.4, and the columns of the fused decode step's weight table.

An op is a qbin Tensor wrapped once at load time, then called per token: `prepare` work (dtype
views, sidecar index arrays) happens in the constructor so that a decode step's `gemv` is one
compiled call. Weights stay views of the memory map (the only copies are the small f16 sidecars
widened to f32, and the q4 n:m tile layout).
"""
from __future__ import annotations

import os

import numba
import numpy as np

from qformat.constants import NF4_LEVELS
from qformat.schemes import FLOAT_KINDS, KINDS, QUANT_KINDS, Tensor

from .threads import run_tasks

# fastmath lets LLVM reassociate the float reductions (that is what vectorizes the inner loops);
# it is restricted to the flags that only change summation order, not NaN/inf handling.
FAST = {"reassoc", "contract", "nsz", "arcp"}
# Numba cannot raise from its worker threads (numba#9380: a bounds check that fails in a prange
# body leaves garbage and a SystemError); with NUMBA_BOUNDSCHECK=1 the kernels run serially, so
# that an index out of bounds is an IndexError (the decode fuzzer, tests/fuzz/fuzz.py).
PARALLEL = os.environ.get("NUMBA_BOUNDSCHECK", "") != "1"


def half_table() -> np.ndarray:
    """float32 value of every float16 bit pattern, indexed by the pattern."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


# Scales are float16 in the file; the kernels take them as their uint16 bits and widen them through
# this 65536-entry table (256 KiB, stays in L2) rather than copying the scales at load time.
H2F = half_table()
NF4_TABLE = NF4_LEVELS.astype(np.float32)

# Rows dequantized per BLAS call on the prefill path: ~8 MiB of float32 per block keeps the block
# in L2/L3 while numpy's matmul consumes it.
GEMM_BLOCK_BYTES = 8 << 20
# Below this many tokens the GEMV loop beats dequantize-then-BLAS (measured on SmolLM2 shapes).
GEMM_MIN_TOKENS = 8


# ---------------------------------------------------------------------------- the weight table
#
# The fused decode step (fused.py) reaches every weight through one int64 row per linear layer:
# which GEMV routine runs it, its geometry, and the addresses of its arrays in the memory map
# (0 where an optional array is absent). The op that runs a weight fills its row (fused_row).

# The GEMV routines a row can name, in code order: one per dense kind (the format's own kinds),
# then the forms that run other kernels. fused.py compiles one branch per routine, and only the
# branches of routines a model's rows name.
ROUTINES = tuple(k for k in KINDS if k in FLOAT_KINDS or k in QUANT_KINDS) + ("q8act", "n:m", "n:m-q4-q8act", "w8a8")
ROUTINE = {name: i for i, name in enumerate(ROUTINES)}

ROUTINE_COL, HAS_ZEROS, GROUP, IN, ROWS, CODES, CODE_BYTES, SCALES, N_GROUPS, ZEROS = range(10)
PERM, OUT_PTR, OUT_COLS, OUT_VALS, FP_COLS, FP_W, N_FP = range(10, 17)  # spec §6.1, §6.2, §6.4
# n:m sparsity (§6.3): n, m, planar positions and their bytes per row (or per tile row), the
# number of row tiles of the q4 tile layout (sparse.tile_rows; 0: rows are not tiled) and the rows
# per tile, from the layout itself (numba's cache of fused.py would not notice a change of TILE)
NM_N, NM_M, NM_INDEX, NM_INDEX_BYTES, N_TILES, NM_TILE = range(17, 23)
# W8A8 (§6.5): ACT 1 dynamic / 2 static int8 activations, ACT_SCALE the static scale's address
ACT, ACT_SCALE = range(23, 25)
# bits per code of a grouped kind, and whether it is nf4 (the generic n:m and the q8act routines
# read them)
CODE_BITS, IS_NF4 = range(25, 27)
# offsets (spec §4.2): the float16 minimum per group, as uint16 bits (0: none)
OFFSETS = 27
# a LoRA adapter beside the weight (kernels/cpu/lora.py): its rank (0: none), the addresses of
# A (rank, in) and Bᵀ (rank, rows), float32
LORA_RANK, LORA_A, LORA_B = range(28, 31)
WIDTH = 31


def new_row(routine: str) -> list[int]:
    """An empty table row running `routine`."""
    row = [0] * WIDTH
    row[ROUTINE_COL] = ROUTINE[routine]
    return row


def grouped_row(routine: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int,
                in_features: int, bits: int) -> tuple[list[int], list[np.ndarray]]:
    """(row, arrays it points into) of dense grouped rows of `bits`-bit codes: codes (rows,
    bytes), scales (rows, groups) as their uint16 bits, zeros (rows, groups) or None when
    symmetric."""
    arrays = [np.ascontiguousarray(a) for a in (codes, scales) + ((zeros,) if zeros is not None else ())]
    row = new_row(routine)
    row[HAS_ZEROS], row[GROUP], row[IN], row[ROWS] = int(zeros is not None), group, in_features, codes.shape[0]
    row[CODES], row[CODE_BYTES] = arrays[0].ctypes.data, codes.shape[1]
    row[SCALES], row[N_GROUPS] = arrays[1].ctypes.data, scales.shape[1]
    row[ZEROS] = arrays[2].ctypes.data if zeros is not None else 0
    row[CODE_BITS] = bits
    return row, arrays


@numba.njit(cache=True)
def add_offsets(offsets, h2f, xs, k, group, out):
    """out (rows,) += offsets (rows, n_groups, float16 bits) · the group sums of xs (k,), the dense
    part's input in stored column order (spec §4.2). Both decode paths call this one loop, so that
    they agree to the bit."""
    rows, n_groups = offsets.shape
    sums = np.zeros(n_groups, np.float32)
    for j in range(k):
        sums[j // group] += xs[j]
    for r in range(rows):
        acc = np.float32(0.0)
        for g in range(n_groups):
            acc += h2f[offsets[r, g]] * sums[g]
        out[r] += acc


@numba.njit(cache=True)
def add_offsets_q8(offsets, h2f, d, sums, out):
    """add_offsets on int8 activations: the group sums are d · (the sum of the group's codes)."""
    rows, n_groups = offsets.shape
    for r in range(rows):
        acc = np.float32(0.0)
        for g in range(n_groups):
            acc += h2f[offsets[r, g]] * (d[g] * np.float32(sums[g]))
        out[r] += acc


class Sidecars:
    """Permutation, sparse outliers, 16-bit columns and offsets of a quantized tensor (all optional)."""

    def __init__(self, t: Tensor):
        a = t.arrays
        rows = t.shape[0]
        if "input_scale" in a:  # W8A8Op divides by it before its dense part (which never sees it)
            raise NotImplementedError(f"tensor {t.name}: input_scale without int8 activations (spec §6.5) has "
                                      "no CPU kernel; re-convert the model (qconvert writes it only for W8A8)")
        self.perm = np.asarray(a["perm"], np.int64) if "perm" in a else None
        self.outliers = None
        self.rowptr = None
        if "outlier_rowptr" in a:
            self.rowptr = np.asarray(a["outlier_rowptr"], np.int32)
            row_of = np.repeat(np.arange(rows), np.diff(a["outlier_rowptr"]))
            self.outliers = (row_of, np.asarray(a["outlier_cols"], np.int64),
                             np.asarray(a["outlier_values"], np.float32))
        self.fp = None
        if "fp_cols" in a:
            self.fp = (np.asarray(a["fp_cols"], np.int64), np.asarray(a["fp_weight"], np.float32))
        # offsets (spec §4.2): the dense kernels run with zeros 0, and o · (group sums of the
        # stored-order input) is added here
        self.offsets = np.asarray(a["offsets"]).view(np.uint16) if "offsets" in a else None
        self.group = min(t.group_size, t.shape[1]) if t.group_size else 0
        self.any = self.perm is not None or self.outliers is not None or self.fp is not None or self.offsets is not None

    def _group_sums(self, x: np.ndarray) -> np.ndarray:
        xs = self.stored_x(x)
        return np.add.reduceat(xs, np.arange(0, xs.shape[-1], self.group), axis=-1)

    def stored_x(self, x: np.ndarray) -> np.ndarray:
        """The dense part's input: x with the 16-bit columns zeroed (their dense weights are zero,
        so this changes no float product, but an int8-activation kernel then scales each group
        by its ordinary channels instead of an outlier's), in stored column order (x[..., perm])."""
        if self.fp is not None:
            x = x.copy()
            x[..., self.fp[0]] = 0.0
        return x if self.perm is None else np.ascontiguousarray(x[..., self.perm])

    def add_gemv(self, x: np.ndarray, out: np.ndarray, quantized: tuple | None = None) -> None:
        """out += the sidecars' products with x; quantized: the (scales, code sums) per group of
        the int8 activations the dense part ran on, which the offsets then multiply."""
        if self.offsets is not None:
            if quantized is not None:
                add_offsets_q8(self.offsets, H2F, *quantized, out)
            else:
                add_offsets(self.offsets, H2F, np.ascontiguousarray(self.stored_x(x), np.float32), x.shape[-1],
                            self.group, out)
        if self.outliers is not None:
            row_of, cols, vals = self.outliers
            out += np.bincount(row_of, weights=vals * x[cols], minlength=out.shape[0]).astype(np.float32)
        if self.fp is not None:
            cols, w = self.fp
            out += w @ x[cols]

    def add_gemm(self, x: np.ndarray, out: np.ndarray) -> None:
        if self.offsets is not None:
            out += self._group_sums(x) @ H2F[self.offsets].T
        if self.outliers is not None:
            row_of, cols, vals = self.outliers
            np.add.at(out.T, row_of, (x[:, cols] * vals).T)
        if self.fp is not None:
            cols, w = self.fp
            out += x[:, cols] @ w.T

    def fill_row(self, row: list[int]) -> list[np.ndarray]:
        """Fill the sidecar columns of a weight-table row; returns the arrays they point into."""
        keep = []

        def put(col: int, arr: np.ndarray) -> None:
            keep.append(arr)
            row[col] = arr.ctypes.data

        if self.perm is not None:
            put(PERM, np.ascontiguousarray(self.perm, np.int32))
        if self.outliers is not None:
            _, cols, vals = self.outliers
            put(OUT_PTR, self.rowptr)
            # an empty array still has a valid (1-element) allocation behind it
            put(OUT_COLS, cols.astype(np.int32) if cols.size else np.zeros(1, np.int32))
            put(OUT_VALS, vals.copy() if vals.size else np.zeros(1, np.float32))
        if self.offsets is not None:
            put(OFFSETS, np.ascontiguousarray(self.offsets))
        if self.fp is not None and self.fp[0].size:
            cols, w = self.fp
            put(FP_COLS, cols.astype(np.int32))
            put(FP_W, np.ascontiguousarray(w))
            row[N_FP] = int(cols.size)
        return keep


class LinearBase:
    """What every CPU linear op has: its shape, its rows (embedding lookup), the GEMM of token
    blocks over dequantized rows (through BLAS, on the kernel threads), and no fused-step row
    unless it fills one."""

    def __init__(self, t: Tensor):
        if len(t.shape) != 2:
            raise ValueError(f"tensor {t.name}: a linear weight is 2-D, got shape {list(t.shape)}")
        self.name = t.name
        self.tensor = t
        self.out_features, self.in_features = t.shape
        self._block = max(1, GEMM_BLOCK_BYTES // (4 * max(1, self.in_features)))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows `ids` of the weight, sidecars included (the embedding lookup): the
        format's NumPy reference of those rows alone (Tensor.take_rows), exact, and a few rows
        per token cost less than loading a compiled dequantizer at start-up."""
        return self.tensor.take_rows(ids).dequantize()

    def gemv(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def gemv_rows(self, x: np.ndarray) -> np.ndarray:
        """One GEMV per token of x (n, in_features)."""
        out = np.empty((x.shape[0], self.out_features), np.float32)
        for i in range(x.shape[0]):
            self.gemv(x[i], out[i])
        return out

    def gemv_many(self, x: np.ndarray) -> np.ndarray:
        """Every token's GEMV, bit for bit (batched decode: a sequence's numbers do not depend
        on the others in its step); layouts with a batched kernel read the weights once."""
        return self.gemv_rows(x)

    def weight_block(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows `ids` in the layout that `prepare_x` gives the activations."""
        raise NotImplementedError

    def prepare_x(self, x: np.ndarray) -> np.ndarray:
        return x

    def add_gemm(self, x: np.ndarray, out: np.ndarray) -> None:
        """Add what the weight blocks leave out (sidecars) to a GEMM's out."""

    def gemm(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.shape[0] < GEMM_MIN_TOKENS:
            return self.gemv_rows(x)
        out = np.empty((x.shape[0], self.out_features), np.float32)
        xs = self.prepare_x(x)
        # at least one block per thread; each dequantizes its rows and multiplies them (threads.py)
        step = max(1, min(self._block, -(-self.out_features // numba.get_num_threads())))

        def block(r0: int) -> None:
            ids = np.arange(r0, min(self.out_features, r0 + step), dtype=np.int64)
            np.matmul(xs, self.weight_block(ids).T, out=out[:, r0:ids[-1] + 1])

        run_tasks(block, range(0, self.out_features, step))
        self.add_gemm(x, out)
        return out

    def fused_row(self) -> tuple[list[int], list[np.ndarray]] | None:
        """(weight-table row, arrays it points into) for the fused decode step, or None when
        this layout runs only on the per-operation path."""
        return None
