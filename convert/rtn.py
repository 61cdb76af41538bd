"""Round-to-nearest quantization with a per-group search of the clipping ratio.

Plain RTN maps each group's [min, max] (or absmax) onto the code range. A few outliers then
stretch the step for the whole group; shrinking the range by a ratio r < 1 clips those outliers
but rounds everything else more finely. For every group we try a grid of ratios and keep the one
with the smallest squared dequantization error (as llama.cpp's and AWQ's RTN baselines do).

The search evaluates the very formula of qformat.schemes.quantize_rtn (float16-rounded scales,
the same zero-point rounding), vectorized over all groups of a block of rows. The stored tensor
is then produced by `Scheme.quantize(name, w, clip=ratios)` from the core, so what is written is
exactly what the core's reference dequantizes; the reported error comes from that dequantization.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qformat.constants import NF4_LEVELS
from qformat.schemes import KINDS, Scheme, Tensor, code_log_scales, expand_log_scales, round_scale

# 1.0 first: on ties the widest range (plain min/max) wins.
CLIP_GRID = np.linspace(1.0, 0.5, 21, dtype=np.float32)

# Rows per block are chosen so that one block holds about this many weights: the working set of
# the search (a few float32 copies of the block) then stays in cache and memory stays bounded.
BLOCK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class QuantStats:
    """Squared error of one tensor's quantization (sums, so they add across tensors)."""

    n: int  # number of weights
    sq_weight: float  # sum of w**2
    sq_err_minmax: float  # sum of (ŵ - w)**2 with the plain range (ratio 1.0)
    sq_err: float  # sum of (ŵ - w)**2 of the stored tensor

    @property
    def mse(self) -> float:
        return self.sq_err / max(self.n, 1)

    @property
    def mse_minmax(self) -> float:
        return self.sq_err_minmax / max(self.n, 1)

    @property
    def rel_mse(self) -> float:
        """Error energy relative to weight energy (scale-free, comparable across tensors)."""
        return self.sq_err / self.sq_weight if self.sq_weight > 0 else 0.0

    @property
    def rel_mse_minmax(self) -> float:
        return self.sq_err_minmax / self.sq_weight if self.sq_weight > 0 else 0.0


def _stored(x: np.ndarray, scheme: Scheme) -> np.ndarray:
    """float32 scale -> the scale `scheme` stores (float16, or the log grid of "-dq"), as float32.
    The core's own rounding rule is used (not a copy) so that the search measures exactly what
    will be stored."""
    return round_scale(x, scheme.log_scales).astype(np.float32)


# Nearest NF4 level through a lookup table: x in [-1, 1] falls in one of _NF4_BINS equal bins;
# each bin holds at most one midpoint between levels (levels are >= 0.07 apart), so the code is
# the bin's lower candidate plus one when x lies above the bin's midpoint.
_NF4_BINS = 4096
_NF4_MIDS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def _nf4_tables() -> tuple[np.ndarray, np.ndarray]:
    lo_edges = -1.0 + 2.0 * np.arange(_NF4_BINS, dtype=np.float64) / _NF4_BINS
    base = np.searchsorted(_NF4_MIDS, lo_edges, side="right").astype(np.uint8)
    hi_edges = lo_edges + 2.0 / _NF4_BINS
    threshold = np.full(_NF4_BINS, np.inf, np.float32)
    inside = np.searchsorted(_NF4_MIDS, hi_edges, side="left") > base
    threshold[inside] = _NF4_MIDS[base[inside]]
    return base, threshold


_NF4_BASE, _NF4_THRESHOLD = _nf4_tables()


def nf4_codes(x: np.ndarray) -> np.ndarray:
    """Index of the nearest NF4 level for each x (values clipped to [-1, 1])."""
    x = np.clip(x, -1.0, 1.0)
    b = np.minimum(((x + 1.0) * (_NF4_BINS / 2)).astype(np.int32), _NF4_BINS - 1)
    return _NF4_BASE[b] + (x > _NF4_THRESHOLD[b])


def group_errors(g: np.ndarray, scheme: Scheme, ratio: float) -> np.ndarray:
    """Sum of squared dequantization errors per group, g (rows, groups, G) with no padding."""
    r = np.float32(ratio)
    if KINDS[scheme.kind].nf4:
        scale = _stored(np.abs(g).max(axis=2) * r, scheme)[:, :, None]
        deq = NF4_LEVELS[nf4_codes(g / scale)] * scale
    else:
        bits = KINDS[scheme.kind].bits
        qmax = (1 << bits) - 1
        if scheme.symmetric:
            scale = _stored(2.0 * (np.abs(g).max(axis=2) * r) / qmax, scheme)
            zero = np.float32(1 << (bits - 1))
        else:
            lo = np.minimum(g.min(axis=2), 0.0) * r
            hi = np.maximum(g.max(axis=2), 0.0) * r
            scale = _stored((hi - lo) / qmax, scheme)
            zero = np.clip(np.round(-lo / scale), 0, qmax)[:, :, None]
        scale = scale[:, :, None]
        q = np.round(g / scale)
        q += zero
        np.clip(q, 0, qmax, out=q)
        q -= zero
        q *= scale
        deq = q
    deq -= g
    deq *= deq
    return deq.sum(axis=2)


def _split_groups(w: np.ndarray, group: int) -> list[np.ndarray]:
    """(rows, k) -> [full groups (rows, n, G), tail (rows, 1, k mod G)] without padding."""
    rows, k = w.shape
    full = k // group
    parts = []
    if full:
        parts.append(w[:, : full * group].reshape(rows, full, group))
    if k % group:
        parts.append(w[:, full * group :].reshape(rows, 1, k % group))
    return parts


def search_clip(w: np.ndarray, scheme: Scheme, grid: np.ndarray = CLIP_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Best ratio per group (rows, n_groups) and the plain-range error per group, for a block w."""
    group = scheme.group_for(w.shape[1])
    ratios, plain = [], []
    for g in _split_groups(w, group):
        best_err = group_errors(g, scheme, grid[0])
        plain.append(best_err)
        best = np.full(best_err.shape, grid[0], np.float32)
        for r in grid[1:]:
            err = group_errors(g, scheme, r)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best[better] = r
        ratios.append(best)
    return np.concatenate(ratios, axis=1), np.concatenate(plain, axis=1)


def plain_error(w: np.ndarray, scheme: Scheme) -> np.ndarray:
    group = scheme.group_for(w.shape[1])
    return np.concatenate([group_errors(g, scheme, 1.0) for g in _split_groups(w, group)], axis=1)


def sum_sq(x: np.ndarray) -> float:
    """Sum of squares accumulated in float64 (float32 sums of millions of terms drift)."""
    return float(np.square(x, dtype=np.float64).sum())


def quantize_weight(name: str, w, scheme: Scheme, *, clip_search: bool = True) -> tuple[Tensor, QuantStats]:
    """Quantize a (rows, k) weight block by block; returns the tensor and its errors.

    w: a float array, or anything with `.shape` whose row slices `w[a:b]` are float arrays
    (checkpoint.LazyRows reads them from disk on demand). Rows are independent in every scheme,
    so the arrays of consecutive row blocks, written into preallocated outputs, are exactly the
    tensor a single call would produce, at a fraction of the memory (log-coded scales are joined
    as their values and coded once, under the whole tensor's exponent).
    """
    rows, k = w.shape
    step = max(1, BLOCK_ELEMENTS // max(k, 1))
    arrays: dict[str, np.ndarray] = {}
    first: Tensor | None = None
    sq_w = sq_plain = sq_err = 0.0
    for start in range(0, rows, step):
        block = np.ascontiguousarray(w[start : start + step], dtype=np.float32)
        if clip_search:
            ratios, plain = search_clip(block, scheme)
            t = scheme.quantize(name, block, clip=ratios)
        else:
            plain = plain_error(block, scheme)
            t = scheme.quantize(name, block)
        err = t.dequantize() - block
        sq_err += sum_sq(err)
        sq_plain += float(plain.sum(dtype=np.float64))
        sq_w += sum_sq(block)
        t = expand_log_scales(t)
        if first is None:
            first = t
            arrays = {role: np.empty((rows, *a.shape[1:]), a.dtype) for role, a in t.arrays.items()}
        for role, a in t.arrays.items():
            arrays[role][start : start + a.shape[0]] = a
    tensor = Tensor(name, first.kind, (rows, k), arrays, first.group_size, first.symmetric)
    if scheme.log_scales:
        tensor = code_log_scales(tensor)
    return tensor, QuantStats(rows * k, sq_w, sq_plain, sq_err)
