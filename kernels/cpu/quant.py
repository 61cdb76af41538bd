"""Numba kernels for the grouped quantized kinds (q8, q6, q5, q4, q3, q2, nf4): GEMV and row dequantization.

Layout (qformat/packing.py): a row is cut into groups of G input columns (the last may be
partial), each padded to P = round_up(len, 8) codes and packed planar: for b-bit codes byte j of a
group holds element j of each of the 8/b slices of S = P*b/8 elements. The GEMV therefore reads x
"per slice": x is first copied into a zero-padded (n_groups, P) buffer `xp` so that slice i of
group g is the contiguous run xp[g, i*S:(i+1)*S], and the inner loop is one shift, one mask and one
multiply-add over S contiguous bytes, which LLVM vectorizes. Widths of 3, 5 and 6 bits are planes
of 1, 2 and 4 bits (packing.planes): their dot product is one per plane, the higher planes scaled
by the power of two of their first bit.

Affine groups are folded as  s * (sum_j q_j x_j - z * sum_j x_j): the per-group sums of x are
computed once per call, so the inner loop never subtracts the zero point.

Scales are float16 in the file; the kernels take them as their uint16 bits and widen them through
a 65536-entry table (`h2f`, 256 KiB, stays in L2) rather than copying the scales at load time.

Measured limit (2-core EPYC, one thread, 1536x576): q8 per channel reads ~30 GB/s (one long loop
per row), q4 with groups of 32 only ~5 GB/s with float activations: a group is 16 bytes, so every
32 multiply-adds end in a horizontal reduction and a scale step. The 4-bit GEMV therefore runs on
int8 activations (as llama.cpp's Q8_0/Q8_1 do): `quantize_x` rounds x once per call, per weight
group, to int8 codes with one float scale (and the sum of the codes, for the zero point), and the
inner loop is 16-bit integer multiply-adds (vpmullw / vpdpwssd) summed in int32, with one float
multiply-add per group:  out = sum_g s_g * d_g * (sum_j q_j a_j - z_g * sum_j a_j). On CPUs with
AVX512-VNNI/BW, groups of a multiple of 64 columns take group_vnni.rows instead (one vpdpbusd per
64 columns and plane; 1.8-2.3x faster on bench_sparse's GEMV shapes). The other widths below 8
bits (q2, q3, q5, q6) take the same int8-activation GEMV, gemv_q8act: their float loops unpack
several planes and measured 3-5x slower than their bytes allow (int3-g64: 1.3 GB/s against
q4's 6.9 on 1536x576). Their portable loop (_groups_q8act, groups that are not 64k columns or
CPUs without VNNI) is not vectorized: about 1 ms for 1536x576 in groups of 32.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .base import FAST, PARALLEL, NF4_TABLE


@njit(cache=True, fastmath=FAST)
def pad_x(x, k, group, padded):
    """x (k,) -> (xp (n_groups, padded) zero-padded per group, per-group sums of x)."""
    n_groups = (k + group - 1) // group
    xp = np.zeros((n_groups, padded), np.float32)
    xs = np.zeros(n_groups, np.float32)
    for g in range(n_groups):
        start = g * group
        stop = min(k, start + group)
        s = np.float32(0.0)
        for e in range(stop - start):
            v = x[start + e]
            xp[g, e] = v
            s += v
        xs[g] = s
    return xp, xs


# Per-group dot products sum_j code_j * x_j over one padded group (S = bytes per slice).

@njit(cache=True, inline="always", fastmath=FAST)
def dot8(cg, xg, plen):
    d = np.float32(0.0)
    for j in range(plen):
        d += np.float32(cg[j]) * xg[j]
    return d


@njit(cache=True, inline="always", fastmath=FAST)
def dot4(cg, xg, plen):
    s = plen // 2
    d = np.float32(0.0)
    for j in range(s):
        # uint8 masks and shifts: an int literal would widen the lane to int64 and cost ~15%
        c = cg[j]
        d += (np.float32(np.int32(c & np.uint8(15))) * xg[j]
              + np.float32(np.int32(c >> np.uint8(4))) * xg[s + j])
    return d


@njit(cache=True, inline="always", fastmath=FAST)
def dot_nf4(cg, xg, plen, levels):
    s = plen // 2
    d = np.float32(0.0)
    for j in range(s):
        c = np.int32(cg[j])
        d += levels[c & 15] * xg[j] + levels[c >> 4] * xg[s + j]
    return d


@njit(cache=True, inline="always", fastmath=FAST)
def dot2(cg, xg, plen):
    s = plen // 4
    d = np.float32(0.0)
    for j in range(s):
        c = np.int32(cg[j])
        d += (np.float32(c & 3) * xg[j] + np.float32((c >> 2) & 3) * xg[s + j]
              + np.float32((c >> 4) & 3) * xg[2 * s + j] + np.float32(c >> 6) * xg[3 * s + j])
    return d


@njit(cache=True, inline="always", fastmath=FAST)
def dot1(cg, xg, plen):
    # a 1-bit plane: byte j holds element j of each of the 8 slices of S = plen/8 elements
    s = plen // 8
    d = np.float32(0.0)
    for j in range(s):
        c = np.int32(cg[j])
        d += (np.float32(c & 1) * xg[j] + np.float32((c >> 1) & 1) * xg[s + j]
              + np.float32((c >> 2) & 1) * xg[2 * s + j] + np.float32((c >> 3) & 1) * xg[3 * s + j]
              + np.float32((c >> 4) & 1) * xg[4 * s + j] + np.float32((c >> 5) & 1) * xg[5 * s + j]
              + np.float32((c >> 6) & 1) * xg[6 * s + j] + np.float32(c >> 7) * xg[7 * s + j])
    return d


@njit(cache=True, inline="always", fastmath=FAST)
def dot3(cg, xg, plen):
    # low two bits: a 2-bit plane of plen/4 bytes; high bit: a 1-bit plane of plen/8 bytes after it
    return dot2(cg, xg, plen) + np.float32(4.0) * dot1(cg[plen // 4:], xg, plen)


@njit(cache=True, inline="always", fastmath=FAST)
def dot5(cg, xg, plen):
    # low four bits: a 4-bit plane of plen/2 bytes; the fifth: a 1-bit plane after it
    return dot4(cg, xg, plen) + np.float32(16.0) * dot1(cg[plen // 2:], xg, plen)


@njit(cache=True, inline="always", fastmath=FAST)
def dot6(cg, xg, plen):
    # low four bits: a 4-bit plane of plen/2 bytes; the top two: a 2-bit plane after it
    return dot4(cg, xg, plen) + np.float32(16.0) * dot2(cg[plen // 2:], xg, plen)


@njit(cache=True, inline="always", fastmath=FAST)
def dot_bits(cg, xg, plen, bits):
    """sum_j code_j * x_j over one padded group of `bits`-bit affine codes."""
    if bits == 8:
        return dot8(cg, xg, plen)
    if bits == 6:
        return dot6(cg, xg, plen)
    if bits == 5:
        return dot5(cg, xg, plen)
    if bits == 4:
        return dot4(cg, xg, plen)
    if bits == 3:
        return dot3(cg, xg, plen)
    return dot2(cg, xg, plen)


# One GEMV per code width, written out rather than made by a factory: numba keys its on-disk
# cache on a function's closure contents, which a factory's closures would change on every run.
# Full groups and the partial tail group are separate loops so that the full-group trip count is
# loop-invariant (that is what vectorizes).

@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemv_q8(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out):
    """out = W @ x for 8-bit codes (one byte per element)."""
    rows, n_groups = scales.shape
    padded = xp.shape[1]
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * 8 // 8
    mid = np.float32(128.0)
    for r in prange(rows):
        crow = codes[r]
        acc = np.float32(0.0)
        for g in range(n_full):
            d = dot8(crow[g * gbytes:(g + 1) * gbytes], xp[g], padded)
            z = np.float32(zeros[r, g]) if has_zeros else mid
            acc += h2f[scales[r, g]] * (d - z * xs[g])
        if n_full < n_groups:
            d = dot8(crow[n_full * gbytes:], xp[n_full], tail_padded)
            z = np.float32(zeros[r, n_full]) if has_zeros else mid
            acc += h2f[scales[r, n_full]] * (d - z * xs[n_full])
        out[r] = acc


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemm_rows_q8(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out):
    """out (n, rows) = W @ x_t for n tokens padded by pad_x (xp (n, n_groups, P), xs (n, n_groups)):
    gemv_q8's sums for a batched decode step (an int8 head), each row's codes widened to float
    once and met by four tokens at a time. Float sums in another order than gemv_q8's: equal to
    it within rounding, not bit for bit."""
    rows, n_groups = scales.shape
    n, _, padded = xp.shape
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    mid = np.float32(128.0)
    n_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(n_blocks):
        w = np.empty(padded, np.float32)
        for r in range(b * ROW_BLOCK, min(rows, (b + 1) * ROW_BLOCK)):
            crow = codes[r]
            for t in range(n):
                out[t, r] = 0.0
            for g in range(n_groups):
                plen = padded if g < n_full else tail_padded
                cg = crow[g * padded:g * padded + plen]
                for j in range(plen):
                    w[j] = np.float32(cg[j])
                sg = h2f[scales[r, g]]
                z = np.float32(zeros[r, g]) if has_zeros else mid
                t = 0
                while t + 4 <= n:
                    x0, x1, x2, x3 = xp[t, g], xp[t + 1, g], xp[t + 2, g], xp[t + 3, g]
                    a0 = np.float32(0.0)
                    a1 = np.float32(0.0)
                    a2 = np.float32(0.0)
                    a3 = np.float32(0.0)
                    for j in range(plen):
                        v = w[j]
                        a0 += v * x0[j]
                        a1 += v * x1[j]
                        a2 += v * x2[j]
                        a3 += v * x3[j]
                    out[t, r] += sg * (a0 - z * xs[t, g])
                    out[t + 1, r] += sg * (a1 - z * xs[t + 1, g])
                    out[t + 2, r] += sg * (a2 - z * xs[t + 2, g])
                    out[t + 3, r] += sg * (a3 - z * xs[t + 3, g])
                    t += 4
                for u in range(t, n):
                    xu = xp[u, g]
                    a = np.float32(0.0)
                    for j in range(plen):
                        a += w[j] * xu[j]
                    out[u, r] += sg * (a - z * xs[u, g])


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemv_q4(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out):
    """out = W @ x for 4-bit codes: byte j = element j | element S+j << 4."""
    rows, n_groups = scales.shape
    padded = xp.shape[1]
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * 4 // 8
    mid = np.float32(8.0)
    for r in prange(rows):
        crow = codes[r]
        acc = np.float32(0.0)
        for g in range(n_full):
            d = dot4(crow[g * gbytes:(g + 1) * gbytes], xp[g], padded)
            z = np.float32(zeros[r, g]) if has_zeros else mid
            acc += h2f[scales[r, g]] * (d - z * xs[g])
        if n_full < n_groups:
            d = dot4(crow[n_full * gbytes:], xp[n_full], tail_padded)
            z = np.float32(zeros[r, n_full]) if has_zeros else mid
            acc += h2f[scales[r, n_full]] * (d - z * xs[n_full])
        out[r] = acc


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemv_q2(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out):
    """out = W @ x for 2-bit codes: byte j holds element j of four slices."""
    rows, n_groups = scales.shape
    padded = xp.shape[1]
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * 2 // 8
    mid = np.float32(2.0)
    for r in prange(rows):
        crow = codes[r]
        acc = np.float32(0.0)
        for g in range(n_full):
            d = dot2(crow[g * gbytes:(g + 1) * gbytes], xp[g], padded)
            z = np.float32(zeros[r, g]) if has_zeros else mid
            acc += h2f[scales[r, g]] * (d - z * xs[g])
        if n_full < n_groups:
            d = dot2(crow[n_full * gbytes:], xp[n_full], tail_padded)
            z = np.float32(zeros[r, n_full]) if has_zeros else mid
            acc += h2f[scales[r, n_full]] * (d - z * xs[n_full])
        out[r] = acc


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemv_q3(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out):
    """out = W @ x for 3-bit codes: a 2-bit plane then a 1-bit plane."""
    rows, n_groups = scales.shape
    padded = xp.shape[1]
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * 3 // 8
    mid = np.float32(4.0)
    for r in prange(rows):
        crow = codes[r]
        acc = np.float32(0.0)
        for g in range(n_full):
            d = dot3(crow[g * gbytes:(g + 1) * gbytes], xp[g], padded)
            z = np.float32(zeros[r, g]) if has_zeros else mid
            acc += h2f[scales[r, g]] * (d - z * xs[g])
        if n_full < n_groups:
            d = dot3(crow[n_full * gbytes:], xp[n_full], tail_padded)
            z = np.float32(zeros[r, n_full]) if has_zeros else mid
            acc += h2f[scales[r, n_full]] * (d - z * xs[n_full])
        out[r] = acc


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def _gemv_planes(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, bits, out):
    """out = W @ x for `bits`-bit codes stored in two planes (5 = 4+1, 6 = 4+2), float x."""
    rows, n_groups = scales.shape
    padded = xp.shape[1]
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * bits // 8
    mid = np.float32(1 << (bits - 1))
    for r in prange(rows):
        crow = codes[r]
        acc = np.float32(0.0)
        for g in range(n_groups):
            plen = padded if g < n_full else tail_padded
            d = dot_bits(crow[g * gbytes:g * gbytes + plen * bits // 8], xp[g], plen, bits)
            z = np.float32(zeros[r, g]) if has_zeros else mid
            acc += h2f[scales[r, g]] * (d - z * xs[g])
        out[r] = acc


@njit(cache=True)
def gemv_q5(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out):
    """out = W @ x for 5-bit codes: a 4-bit plane then a 1-bit plane (float activations: only
    layouts without int8 activations, kernels.layouts.q8act)."""
    _gemv_planes(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, 5, out)


@njit(cache=True)
def gemv_q6(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out):
    """out = W @ x for 6-bit codes: a 4-bit plane then a 2-bit plane (as gemv_q5)."""
    _gemv_planes(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, 6, out)


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def gemv_nf4(codes, scales, zeros, has_zeros, h2f, xp, xs, k, group, out):
    """out = W @ x for NF4 codes (4-bit layout, value = scale * NF4_LEVELS[code]); zeros unused."""
    rows, n_groups = scales.shape
    padded = xp.shape[1]
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded // 2
    levels = NF4_TABLE
    for r in prange(rows):
        crow = codes[r]
        acc = np.float32(0.0)
        for g in range(n_full):
            acc += h2f[scales[r, g]] * dot_nf4(crow[g * gbytes:(g + 1) * gbytes], xp[g], padded, levels)
        if n_full < n_groups:
            acc += h2f[scales[r, n_full]] * dot_nf4(crow[n_full * gbytes:], xp[n_full], tail_padded, levels)
        out[r] = acc


# 4-bit codes times int8 activations (the decode path of q4; see the module docstring).

@njit(cache=True)
def quantize_x(x, k, group, padded):
    """x (k,) -> (xq (n_groups, padded) int8, d (n_groups,) f32, sums (n_groups,) i32).

    Per group of `group` columns: d = max|x| / 127, xq = round_half_even(x / d) (0 where the group
    is all zero), zero-padded to `padded` columns; sums = sum of the group's codes. No fastmath:
    the division must round exactly as in qformat.kernels.reference.quantize_activations."""
    n_groups = (k + group - 1) // group
    xq = np.zeros((n_groups, padded), np.int8)
    d = np.zeros(n_groups, np.float32)
    sums = np.zeros(n_groups, np.int32)
    for g in range(n_groups):
        start = g * group
        stop = min(k, start + group)
        amax = np.float32(0.0)
        for e in range(start, stop):
            amax = max(amax, abs(x[e]))
        if not amax > 0:  # an all-zero group (or NaN input): codes stay 0
            continue
        dg = amax / np.float32(127.0)
        d[g] = dg
        total = 0
        for e in range(stop - start):
            q = min(127, max(-127, np.int32(np.rint(x[start + e] / dg))))
            xq[g, e] = q
            total += q
        sums[g] = total
    return xq, d, sums


@njit(cache=True)
def quantize_rows(x, k, group, padded):
    """quantize_x of every row of x (n, k): xq (n, n_groups, padded), d and sums (n, n_groups)."""
    n = x.shape[0]
    n_groups = (k + group - 1) // group
    xq = np.empty((n, n_groups, padded), np.int8)
    d = np.empty((n, n_groups), np.float32)
    sums = np.empty((n, n_groups), np.int32)
    for t in range(n):
        xq[t], d[t], sums[t] = quantize_x(x[t], k, group, padded)
    return xq, d, sums


@njit(cache=True)
def split_slices(xq, k, group):
    """xq (n_groups, P) -> (lo, hi): the activations meeting each byte's low and high nibble.

    lo[g*S + j] = xq[g, j] and hi[g*S + j] = xq[g, S_g + j] for S = P/2 and S_g the group's bytes
    (S, or the partial tail group's own half). Two separate arrays indexed like the code bytes:
    one array read at two offsets compiled to scalar code (6x slower)."""
    n_groups, padded = xq.shape
    s = padded // 2
    n_full = k // group
    lo = np.zeros(n_groups * s, np.int8)
    hi = np.zeros(n_groups * s, np.int8)
    for g in range(n_groups):
        sg = s if g < n_full else ((k - n_full * group) + 7) // 8 * 4
        for j in range(sg):
            lo[g * s + j] = xq[g, j]
            hi[g * s + j] = xq[g, sg + j]
    return lo, hi


@njit(cache=True)  # no fastmath: the float sums in program order, as gemm_rows_q8act repeats them
def _rows_q4_q8act(codes, scales, zeros, has_zeros, h2f, lo, hi, d, sums, k, group, r0, r1, out):
    """out[r0:r1] = the full groups' part of W @ x (group % 8 == 0, so S = group / 2)."""
    # Kept apart from the parallel loop and from the tail group, with S = group // 2 and the byte
    # index written as g*S + i in every subscript: the forms under which LLVM vectorizes the
    # integer loop (a padded-length S, a tail loop in the same function or one array read at two
    # offsets each measured 1.5-6x slower)
    n_full = k // group
    s = group // 2
    for r in range(r0, r1):
        crow = codes[r]
        srow = scales[r]
        acc = np.float32(0.0)
        for g in range(n_full):
            dot = np.int32(0)
            for i in range(s):
                j = g * s + i
                c = crow[j]
                # int16 products (|15 * 127| fits) summed in int32; each step is cast back so
                # that numba's int64 promotion does not widen the vector lanes
                dot = np.int32(dot + np.int32(np.int16(np.int16(c & np.uint8(15)) * np.int16(lo[j])
                                                       + np.int16(c >> np.uint8(4)) * np.int16(hi[j]))))
            z = np.int32(zeros[r, g]) if has_zeros else np.int32(8)
            acc += h2f[srow[g]] * d[g] * np.float32(np.int32(dot - np.int32(z * sums[g])))
        out[r] = acc


# Rows per parallel task of the int8-activation GEMV: enough to amortize a task, few enough that
# two threads split a 192-row projection evenly.
ROW_BLOCK = 32


@njit(cache=True)  # no fastmath: see _rows_q4_q8act
def _groups_q8act(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, g0, r0, r1, out):
    """out[r0:r1] += groups g0.. of W @ x for 2- to 6-bit codes and quantize_x's activations, plane
    by plane (packing.planes), each plane's fields slice by slice, in int32 (the portable kernel
    of widths other than 4, and the partial last group the VNNI rows leave)."""
    n_groups = scales.shape[1]
    n_full = k // group
    padded = (group + 7) // 8 * 8
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * bits // 8
    mid = np.int32(1 << (bits - 1))
    for r in range(r0, r1):
        crow = codes[r]
        acc = np.float32(0.0)
        for g in range(g0, n_groups):
            plen = padded if g < n_full else tail_padded
            xg = xq[g]
            base = g * gbytes
            dot = np.int32(0)
            shift = 0
            for width in (4, 2, 1):
                if (bits & width) == 0:
                    continue
                s = plen * width // 8
                mask = np.int32((1 << width) - 1)
                part = np.int32(0)
                for i in range(8 // width):
                    for j in range(s):
                        part += ((np.int32(crow[base + j]) >> np.int32(width * i)) & mask) * np.int32(xg[i * s + j])
                dot += part << np.int32(shift)
                base += s
                shift += width
            z = np.int32(zeros[r, g]) if has_zeros else mid
            acc += h2f[scales[r, g]] * d[g] * np.float32(dot - z * sums[g])
        out[r] += acc


@njit(cache=True)
def _block_q8act(codes, scales, zeros, has_zeros, h2f, xq, d, sums, lo, hi, vnni, k, group, bits, r0, r1, out):
    """out[r0:r1] = rows r0..r1-1 of W @ x (one task of gemv_q8act and gemm_rows_q8act)."""
    n_groups = scales.shape[1]
    if vnni:
        g0 = ROWS_64(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, r0, r1, out)
    elif bits == 4:
        _rows_q4_q8act(codes, scales, zeros, has_zeros, h2f, lo, hi, d, sums, k, group, r0, r1, out)
        g0 = k // group
    else:
        out[r0:r1] = 0.0
        g0 = 0
    if g0 < n_groups:
        _groups_q8act(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, g0, r0, r1, out)


@njit(cache=True)
def _nibble_inputs(xq, k, group, bits, vnni):
    """What _rows_q4_q8act reads (split_slices), or placeholders where it is not run."""
    if bits == 4 and not vnni:
        return split_slices(xq, k, group)
    return np.zeros(1, np.int8), np.zeros(1, np.int8)


@njit(cache=True, parallel=PARALLEL)
def gemv_q8act(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, out):
    """out = W @ x for `bits`-bit codes (2 to 6) and x quantized by `quantize_x` (xq, d, sums);
    group % 8 == 0. Groups of a multiple of 64 columns on group_vnni.rows (AVX512-VNNI CPUs);
    elsewhere q4 takes the int16 kernel above, other widths (and every partial group left)
    _groups_q8act."""
    rows = scales.shape[0]
    vnni = VNNI_ROWS and group % 64 == 0
    lo, hi = _nibble_inputs(xq, k, group, bits, vnni)
    n_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(n_blocks):
        r0 = b * ROW_BLOCK
        _block_q8act(codes, scales, zeros, has_zeros, h2f, xq, d, sums, lo, hi, vnni, k, group, bits, r0,
                     min(rows, r0 + ROW_BLOCK), out)


@njit(cache=True, fastmath=FAST)
def unpack_codes(crow, bits, k, group, padded, w):
    """w (n_groups · P,) float32 = the codes (0 .. 2**bits - 1) of one row, group by group, in
    quantize_x's column layout (packing.planes: plane by plane, slice by slice); zeros past a
    partial last group's own padded length."""
    n_groups = w.size // padded
    n_full = k // group
    gbytes = padded * bits // 8
    if bits == 4 and n_full == n_groups:  # the common case, in loops that vectorize
        # (over slices indexed from 0: a computed index g·S + i has a sign LLVM cannot prove,
        # and numba's negative-index wraparound then keeps the loop scalar, ~8x slower)
        s = padded // 2
        for g in range(n_groups):
            cg = crow[g * s:(g + 1) * s]
            lo = w[g * padded:g * padded + s]
            hi = w[g * padded + s:(g + 1) * padded]
            for i in range(cg.size):
                c = cg[i]
                # through int32: LLVM converts int32 lanes to float, not int64 ones (AVX2)
                lo[i] = np.float32(np.int32(c & np.uint8(15)))
                hi[i] = np.float32(np.int32(c >> np.uint8(4)))
        return
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    for g in range(n_groups):
        plen = padded if g < n_full else tail_padded
        w[g * padded:(g + 1) * padded] = 0.0
        base = g * gbytes
        shift = 0
        for width in (4, 2, 1):
            if (bits & width) == 0:
                continue
            s = plen * width // 8
            mask = (1 << width) - 1
            for i in range(8 // width):
                for j in range(s):
                    code = (np.int32(crow[base + j]) >> np.int32(width * i)) & np.int32(mask)
                    w[g * padded + i * s + j] += np.float32(code << np.int32(shift))
            base += s
            shift += width


# gemm_rows_q8act sums integer products in float32: exact while every partial sum stays below
# 2**24, i.e. for groups of at most this many columns at 6 bits (63 · 127 per product).
EXACT_FLOAT_GROUP = (1 << 24) // (63 * 127)


@njit(cache=True, fastmath=FAST)
def group_dots(w, xf, padded, dots):
    """dots[g, t] = Σ_e w[g·P + e] · xf[t, g·P + e]: integer codes times integer activations, in
    float32 (exact: EXACT_FLOAT_GROUP), four tokens at a time so that each weight vector loaded
    meets four activation rows (slices indexed from 0: see unpack_codes)."""
    n = xf.shape[0]
    n_groups = w.size // padded
    t = 0
    while t + 4 <= n:
        for g in range(n_groups):
            lo = g * padded
            wg = w[lo:lo + padded]
            x0, x1, x2, x3 = xf[t, lo:lo + padded], xf[t + 1, lo:lo + padded], xf[t + 2, lo:lo + padded], \
                xf[t + 3, lo:lo + padded]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for i in range(wg.size):
                v = wg[i]
                a0 += v * x0[i]
                a1 += v * x1[i]
                a2 += v * x2[i]
                a3 += v * x3[i]
            dots[g, t] = np.int32(a0)
            dots[g, t + 1] = np.int32(a1)
            dots[g, t + 2] = np.int32(a2)
            dots[g, t + 3] = np.int32(a3)
        t += 4
    for u in range(t, n):
        for g in range(n_groups):
            lo = g * padded
            wg = w[lo:lo + padded]
            xu = xf[u, lo:lo + padded]
            a = np.float32(0.0)
            for i in range(wg.size):
                a += wg[i] * xu[i]
            dots[g, u] = np.int32(a)


@njit(cache=True)  # no fastmath: the GEMV's float order exactly
def _scale_dots(dots, scales, zeros, has_zeros, h2f, d, sums, r, split, mid, acc, rest, out):
    """out[t, r] for every token t from row r's integer group dots (n_groups, n), d and sums
    (n_groups, n): per token the float sums of gemv_q8act in its order (groups below `split`,
    the q4 kernel's full groups, then the rest, _groups_q8act's); the tokens side by side in
    vector lanes. acc, rest: (n,) scratch."""
    n_groups = scales.shape[1]
    n = dots.shape[1]
    acc[:] = 0.0
    rest[:] = 0.0
    for g in range(split):
        sg = h2f[scales[r, g]]
        z = np.int32(zeros[r, g]) if has_zeros else mid
        for t in range(n):
            acc[t] += sg * d[g, t] * np.float32(np.int32(dots[g, t] - np.int32(z * sums[g, t])))
    for g in range(split, n_groups):
        sg = h2f[scales[r, g]]
        z = np.int32(zeros[r, g]) if has_zeros else mid
        for t in range(n):
            rest[t] += sg * d[g, t] * np.float32(dots[g, t] - z * sums[g, t])
    for t in range(n):
        out[t, r] = acc[t] + rest[t]


@njit(cache=True, parallel=PARALLEL)
def gemm_rows_q8act(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, out):
    """out (n, rows) = W @ x_t for n tokens quantized by `quantize_x` (xq (n, n_groups, P), d and
    sums (n, n_groups)): a few tokens at once (batched decode), the weights read from memory once
    for all of them, each token's result bit for bit its gemv_q8act's. On VNNI CPUs
    group_vnni.rows_tokens splits each row's codes once for four tokens; elsewhere it unpacks
    each row's codes once and takes every token's integer group sums from them (group_dots),
    then scales them in the GEMV's float order."""
    n, rows = out.shape
    n_groups = scales.shape[1]
    vnni = VNNI_ROWS and group % 64 == 0
    n_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    if vnni:
        for b in prange(n_blocks):
            r0, r1 = b * ROW_BLOCK, min(rows, (b + 1) * ROW_BLOCK)
            g0 = ROWS_64_TOKENS(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, r0, r1, out)
            if g0 < n_groups:
                for t in range(n):
                    _groups_q8act(codes, scales, zeros, has_zeros, h2f, xq[t], d[t], sums[t], k, group, bits, g0, r0,
                                  r1, out[t])
        return
    if group > EXACT_FLOAT_GROUP:
        for b in prange(n_blocks):
            r0 = b * ROW_BLOCK
            for t in range(n):
                _block_q8act(codes, scales, zeros, has_zeros, h2f, xq[t], d[t], sums[t], xq[t, 0], xq[t, 0], vnni,
                             k, group, bits, r0, min(rows, r0 + ROW_BLOCK), out[t])
        return
    split = k // group if bits == 4 else 0
    mid = np.int32(1 << (bits - 1))
    padded = xq.shape[2]
    xf = np.empty((n, n_groups * padded), np.float32)  # C-contiguous (a reshape would type as 'A')
    for t in range(n):
        for g in range(n_groups):
            for e in range(padded):
                xf[t, g * padded + e] = xq[t, g, e]
    d_t = np.ascontiguousarray(d.T)  # (n_groups, n): the tokens of a group side by side
    sums_t = np.ascontiguousarray(sums.T)
    for b in prange(n_blocks):
        w = np.empty(n_groups * padded, np.float32)
        dots = np.empty((n_groups, n), np.int32)
        acc = np.empty(n, np.float32)
        rest = np.empty(n, np.float32)
        for r in range(b * ROW_BLOCK, min(rows, (b + 1) * ROW_BLOCK)):
            unpack_codes(codes[r], bits, k, group, padded, w)
            group_dots(w, xf, padded, dots)
            _scale_dots(dots, scales, zeros, has_zeros, h2f, d_t, sums_t, r, split, mid, acc, rest, out)


@njit(cache=True)
def _rows_none(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, r0, r1, out):
    """Stands in for group_vnni.rows where it is not compiled (never called: VNNI_ROWS is False)."""
    return 0


# Per-group unpacking into a float row segment `og` (plen padded elements): value = s * (q - z).

@njit(cache=True, inline="always", fastmath=FAST)
def deq8(cg, og, plen, s, z):
    for j in range(plen):
        og[j] = s * (np.float32(cg[j]) - z)


@njit(cache=True, inline="always", fastmath=FAST)
def deq4(cg, og, plen, s, z):
    h = plen // 2
    for j in range(h):
        c = np.int32(cg[j])
        og[j] = s * (np.float32(c & 15) - z)
        og[h + j] = s * (np.float32(c >> 4) - z)


@njit(cache=True, inline="always", fastmath=FAST)
def deq2(cg, og, plen, s, z):
    q = plen // 4
    for j in range(q):
        c = np.int32(cg[j])
        og[j] = s * (np.float32(c & 3) - z)
        og[q + j] = s * (np.float32((c >> 2) & 3) - z)
        og[2 * q + j] = s * (np.float32((c >> 4) & 3) - z)
        og[3 * q + j] = s * (np.float32(c >> 6) - z)


@njit(cache=True, inline="always", fastmath=FAST)
def add_plane1(cg, og, plen, step):
    # og += step * (bit of a 1-bit plane), 8 slices of plen/8 elements
    e = plen // 8
    for i in range(8):
        for j in range(e):
            og[i * e + j] += step * np.float32((np.int32(cg[j]) >> i) & 1)


@njit(cache=True, inline="always", fastmath=FAST)
def add_plane2(cg, og, plen, step):
    # og += step * (code of a 2-bit plane), 4 slices of plen/4 elements
    q = plen // 4
    for i in range(4):
        for j in range(q):
            og[i * q + j] += step * np.float32((np.int32(cg[j]) >> (2 * i)) & 3)


@njit(cache=True, inline="always", fastmath=FAST)
def deq3(cg, og, plen, s, z):
    # the 2-bit plane with z, then add 4*s for every set bit of the 1-bit plane
    deq2(cg, og, plen, s, z)
    add_plane1(cg[plen // 4:], og, plen, np.float32(4.0) * s)


@njit(cache=True, inline="always", fastmath=FAST)
def deq5(cg, og, plen, s, z):
    deq4(cg, og, plen, s, z)
    add_plane1(cg[plen // 2:], og, plen, np.float32(16.0) * s)


@njit(cache=True, inline="always", fastmath=FAST)
def deq6(cg, og, plen, s, z):
    deq4(cg, og, plen, s, z)
    add_plane2(cg[plen // 2:], og, plen, np.float32(16.0) * s)


# Dequantization to the padded layout: group g occupies columns [g*P, g*P + P) of `out`
# (P = padded group length); columns past a group's real length hold s * (0 - z) and must meet
# zeros in the activations (see pad_rows). Written out per width for the reason given above.

@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def dequant_q8(codes, scales, zeros, has_zeros, h2f, k, group, rows, out):
    """Rows `rows` of 8-bit codes to float32 (len(rows), n_groups * P), padded layout."""
    n_groups = scales.shape[1]
    padded = (group + 7) // 8 * 8
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * 8 // 8
    mid = np.float32(128.0)
    for i in prange(rows.size):
        r = rows[i]
        crow = codes[r]
        orow = out[i]
        for g in range(n_groups):
            plen = padded if g < n_full else tail_padded
            z = np.float32(zeros[r, g]) if has_zeros else mid
            deq8(crow[g * gbytes:g * gbytes + plen * 8 // 8], orow[g * padded:g * padded + plen],
                  plen, h2f[scales[r, g]], z)


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def dequant_q4(codes, scales, zeros, has_zeros, h2f, k, group, rows, out):
    """Rows `rows` of 4-bit codes to float32 (len(rows), n_groups * P), padded layout."""
    n_groups = scales.shape[1]
    padded = (group + 7) // 8 * 8
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * 4 // 8
    mid = np.float32(8.0)
    for i in prange(rows.size):
        r = rows[i]
        crow = codes[r]
        orow = out[i]
        for g in range(n_groups):
            plen = padded if g < n_full else tail_padded
            z = np.float32(zeros[r, g]) if has_zeros else mid
            deq4(crow[g * gbytes:g * gbytes + plen * 4 // 8], orow[g * padded:g * padded + plen],
                  plen, h2f[scales[r, g]], z)


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def dequant_q2(codes, scales, zeros, has_zeros, h2f, k, group, rows, out):
    """Rows `rows` of 2-bit codes to float32 (len(rows), n_groups * P), padded layout."""
    n_groups = scales.shape[1]
    padded = (group + 7) // 8 * 8
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * 2 // 8
    mid = np.float32(2.0)
    for i in prange(rows.size):
        r = rows[i]
        crow = codes[r]
        orow = out[i]
        for g in range(n_groups):
            plen = padded if g < n_full else tail_padded
            z = np.float32(zeros[r, g]) if has_zeros else mid
            deq2(crow[g * gbytes:g * gbytes + plen * 2 // 8], orow[g * padded:g * padded + plen],
                  plen, h2f[scales[r, g]], z)


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def dequant_q3(codes, scales, zeros, has_zeros, h2f, k, group, rows, out):
    """Rows `rows` of 3-bit codes to float32 (len(rows), n_groups * P), padded layout."""
    n_groups = scales.shape[1]
    padded = (group + 7) // 8 * 8
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * 3 // 8
    mid = np.float32(4.0)
    for i in prange(rows.size):
        r = rows[i]
        crow = codes[r]
        orow = out[i]
        for g in range(n_groups):
            plen = padded if g < n_full else tail_padded
            z = np.float32(zeros[r, g]) if has_zeros else mid
            deq3(crow[g * gbytes:g * gbytes + plen * 3 // 8], orow[g * padded:g * padded + plen],
                  plen, h2f[scales[r, g]], z)


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def _dequant_planes(codes, scales, zeros, has_zeros, h2f, k, group, bits, rows, out):
    """Rows `rows` of 5- or 6-bit codes to float32 (len(rows), n_groups * P), padded layout."""
    n_groups = scales.shape[1]
    padded = (group + 7) // 8 * 8
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded * bits // 8
    mid = np.float32(1 << (bits - 1))
    for i in prange(rows.size):
        r = rows[i]
        crow = codes[r]
        orow = out[i]
        for g in range(n_groups):
            plen = padded if g < n_full else tail_padded
            z = np.float32(zeros[r, g]) if has_zeros else mid
            cg = crow[g * gbytes:g * gbytes + plen * bits // 8]
            og = orow[g * padded:g * padded + plen]
            if bits == 5:
                deq5(cg, og, plen, h2f[scales[r, g]], z)
            else:
                deq6(cg, og, plen, h2f[scales[r, g]], z)


@njit(cache=True)
def dequant_q5(codes, scales, zeros, has_zeros, h2f, k, group, rows, out):
    """Rows `rows` of 5-bit codes to float32 (len(rows), n_groups * P), padded layout."""
    _dequant_planes(codes, scales, zeros, has_zeros, h2f, k, group, 5, rows, out)


@njit(cache=True)
def dequant_q6(codes, scales, zeros, has_zeros, h2f, k, group, rows, out):
    """Rows `rows` of 6-bit codes to float32 (len(rows), n_groups * P), padded layout."""
    _dequant_planes(codes, scales, zeros, has_zeros, h2f, k, group, 6, rows, out)


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def dequant_nf4(codes, scales, zeros, has_zeros, h2f, k, group, rows, out):
    """Rows of NF4 codes to float32, padded layout (padding columns hold s * NF4[0])."""
    n_groups = scales.shape[1]
    padded = (group + 7) // 8 * 8
    n_full = k // group
    tail_padded = ((k - n_full * group) + 7) // 8 * 8
    gbytes = padded // 2
    levels = NF4_TABLE
    for i in prange(rows.size):
        r = rows[i]
        crow = codes[r]
        for g in range(n_groups):
            plen = padded if g < n_full else tail_padded
            s = h2f[scales[r, g]]
            h = plen // 2
            base = g * padded
            for j in range(h):
                c = np.int32(crow[g * gbytes + j])
                out[i, base + j] = s * levels[c & 15]
                out[i, base + h + j] = s * levels[c >> 4]


@njit(cache=True, nogil=True)
def pad_rows(x, k, group, out):
    """x (n, k) -> out (n, n_groups * P): each group's columns at g*P, zeros in the padding.
    Serial: prefill runs it on the kernel threads' pool (threads.run_tasks), where a numba
    parallel loop would leave its own threads spinning beside BLAS."""
    n = x.shape[0]
    padded = (group + 7) // 8 * 8
    n_groups = (k + group - 1) // group
    for i in range(n):
        for g in range(n_groups):
            start = g * group
            length = min(k, start + group) - start
            for e in range(length):
                out[i, g * padded + e] = x[i, start + e]
            for e in range(length, padded):
                out[i, g * padded + e] = 0.0


# The kernel for groups of a multiple of 64 columns, chosen here (features): vpdpbusd
# on AVX512-VNNI/BW CPUs.
from . import group_vnni  # noqa: E402
from .features import VNNI_BW  # noqa: E402

ROWS_64 = group_vnni.rows if VNNI_BW else _rows_none
ROWS_64_TOKENS = group_vnni.rows_tokens if VNNI_BW else _rows_none
VNNI_ROWS = VNNI_BW

# The float-activation GEMV and the row dequantizer of each grouped kind (the GEMV on int8
# activations, gemv_q8act, is chosen by the ops where kernels.layouts.q8act says so).
GEMV = {"q8": gemv_q8, "q6": gemv_q6, "q5": gemv_q5, "q4": gemv_q4, "q3": gemv_q3, "q2": gemv_q2, "nf4": gemv_nf4}
DEQUANT = {"q8": dequant_q8, "q6": dequant_q6, "q5": dequant_q5, "q4": dequant_q4, "q3": dequant_q3,
           "q2": dequant_q2, "nf4": dequant_nf4}
