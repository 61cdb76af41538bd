"""Prefill GEMM of q2-q6 and q8 weights on int8 activations through AVX512-VNNI.

The float path dequantizes rows to f32 and calls BLAS. Here the products are bytes. For q2-q6
weights the activations are quantized per token and weight group exactly as the decode GEMV
quantizes them (quant.quantize_x: d = max|x|/127, round half even), so prompt and decode
steps see the same numbers; W8A8 passes its own per-token codes (per_token_input).

  For a block of 16 rows, the codes are unpacked once into a scratch buffer of steps of 4
  columns: step s is 64 bytes, 4 consecutive columns of each of the 16 rows (one 32-bit lane per
  row). A tile of TOKENS tokens then runs through the block: per step, one vpdpbusd per token
  multiplies the 64 code bytes by that token's 4 activation bytes broadcast to every lane, so a
  lane accumulates its row's dot product and no horizontal sum is ever needed (q4 and q8 are
  unpacked by whole words; the other widths group by group from their planes, spec §5, into
  column order, then by words). Each group's
  int32 accumulators start at -z·Σa (the zero-point term, exact in integers) and end in one
  float multiply-add by s·d per token: lanes are rows, so the scales are a vector load.

  out[t, r] = Σ_g s_rg · d_tg · (Σ_j c_rj a_tj − z_rg Σ_j a_tj),  the same integers as
  qformat.kernels.reference.gemv_q8act_reference per token; only the float sum's order differs.

The unpacked block (16 rows × padded columns) stays in L1/L2 while every token tile passes over
it. 330-365 G multiply-adds/s on two Zen 4 cores (1536x576 and 576x1536, 512 tokens), against
~100 G float multiply-adds/s for the dequantize + BLAS path; SmolLM2-135M int4-g64 prefill went
from 449 to 1776 tok/s (README). Compiled only on CPUs with AVX512-VNNI (features.VNNI);
elsewhere prefill keeps the float path.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qformat.packing import planes, row_nbytes

from .group_vnni import split_fields
from .threads import run_row_chunks, run_tasks

# Rows per block: one 32-bit lane each in a 512-bit vector.
LANES = 16
# Tokens per tile: TOKENS int32 and TOKENS float accumulators plus the code vector fit the 32
# vector registers.
TOKENS = 8
# Below this many tokens a GEMV per token is faster: unpacking every row's codes costs as much
# as ~16 GEMVs (measured crossover 16-24 tokens on SmolLM2's projections, two threads).
MIN_TOKENS = 16
# Kinds this GEMM unpacks (bits per code); the zero point of symmetric codes is the middle code.
BITS = {"q2": 2, "q3": 3, "q4": 4, "q5": 5, "q6": 6, "q8": 8}

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_V16 = ir.VectorType(_I32, 16)
_F16V = ir.VectorType(_F32, 16)
_B64 = ir.VectorType(_I8, 64)


def act_group(kind: str, group: int, k: int) -> int | None:
    """Columns per activation scale when a `kind` weight of k columns in groups of `group` takes
    this GEMM, else None. q4: the weight group, as its decode GEMV quantizes. q8: 64 where the
    weight groups are whole multiples of 64 (per-channel rows among them: W8A8's per-token
    scale is then the same for every group of a token), else the weight group."""
    if kind == "q8" and (group % 64 == 0 or group >= k):
        return 64
    if kind not in BITS or group % 8 or row_nbytes(k, group, BITS[kind]) % 4:
        return None  # the unpacking reads rows as whole 32-bit words
    return group


@njit(cache=True, nogil=True)
def _amax_bits(b):
    m = np.int32(0)
    for e in range(b.size):
        m = max(m, b[e] & np.int32(0x7FFFFFFF))
    return m


@njit(cache=True, nogil=True, error_model="numpy")
def _round_group(xs, dg, q):
    total = np.int32(0)
    for e in range(xs.size):
        c = np.int32(min(np.float32(127.0), max(np.float32(-127.0), np.rint(xs[e] / dg))))
        q[e] = c
        total = np.int32(total + c)
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_rows(x, k, group, xq, d, sums):
    """x (n, k) -> xq (≥n, n_groups·group) int8, d and sums (≥n, n_groups): quant.quantize_x of
    every token (rows of xq past n, and columns past k, must already be zero).

    Written so that LLVM vectorizes the loops over a group (2.4x faster on 512x1536): max|x| as
    the integer maximum of the bit patterns without the sign (the same order for every non-NaN
    float; a non-finite maximum gives a zero group), one flat loop per group, and numpy's error
    model, which drops the per-division zero check. No fastmath: x / d rounds as the reference."""
    n_groups = d.shape[1]
    bits = x.view(np.int32)
    amax = np.zeros(1, np.int32)
    amax_f = amax.view(np.float32)  # the bits back as a float, without a scalar bitcast
    for i in range(x.shape[0]):
        for g in range(n_groups):
            start = g * group
            stop = min(k, start + group)
            amax[0] = _amax_bits(bits[i, start:stop])
            if not (amax_f[0] > 0 and amax[0] < np.int32(0x7F800000)):
                d[i, g] = 0.0
                sums[i, g] = 0
                xq[i, start:stop] = 0
                continue
            dg = amax_f[0] / np.float32(127.0)
            d[i, g] = dg
            sums[i, g] = _round_group(x[i, start:stop], dg, xq[i, start:stop])


@intrinsic
def _codes64(typingctx, cb, base, bits, out8):
    """out8[:64] = the codes of a group of 64 columns in column order, from its planes starting
    at byte `base` of cb (group_vnni.split_fields per plane, or-ed); bits a literal."""
    if not isinstance(bits, types.IntegerLiteral):
        return None
    width_of = bits.literal_value

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0]).data
        dst = context.make_array(signature.args[3])(context, builder, args[3]).data
        offset = args[1]
        codes = ir.Constant(_B64, [0] * 64)
        shift = 0
        for width in planes(width_of):
            ptr = builder.bitcast(builder.gep(src, [offset]), ir.VectorType(_I8, 8 * width).as_pointer())
            codes = builder.or_(codes, split_fields(builder, builder.load(ptr, align=1), width, shift))
            offset = builder.add(offset, ir.Constant(offset.type, 8 * width))
            shift += width
        builder.store(codes, builder.bitcast(dst, _B64.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(cb, base, bits, out8), codegen


@njit(cache=True, inline="always")
def _codes_of_64(cb, base, bits, out8):
    """_codes64 with `bits` as a literal."""
    if bits == 2:
        _codes64(cb, base, 2, out8)
    elif bits == 3:
        _codes64(cb, base, 3, out8)
    elif bits == 5:
        _codes64(cb, base, 5, out8)
    else:
        _codes64(cb, base, 6, out8)


@njit(cache=True, inline="always")
def _unpack_planes(cb, base, plen, bits, out8):
    """out8[:plen] = the codes of one group in column order, from its planes of 4, 2 and 1 bits
    (spec §5) starting at byte `base` of a row's bytes cb: each slice's fields are contiguous in
    both, so every loop here runs over contiguous bytes (and vectorizes); a group of 64 columns
    in one vector pass (_codes64)."""
    if plen == 64:
        _codes_of_64(cb, base, bits, out8)
        return
    out8[:plen] = 0
    shift = 0
    for width in (4, 2, 1):
        if (bits & width) == 0:
            continue
        s = plen * width // 8
        mask = np.uint8((1 << width) - 1)
        plane = cb[base:base + s]
        for i in range(8 // width):
            o = out8[i * s:(i + 1) * s]  # indexed from 0: see quant.unpack_codes
            for j in range(s):
                o[j] |= ((plane[j] >> np.uint8(width * i)) & mask) << np.uint8(shift)
        base += s
        shift += width


@njit(cache=True, inline="always")
def _unpack_block(codes32, scales, zeros, has_zeros, h2f, bits, k, group, agroup, r0, wb32, sb, zb, gb):
    """Rows r0..r0+15 -> wb32 (steps·16,) uint32: step s, lane l = columns 4s..4s+3 of row r0+l as
    bytes; sb / zb (n_agroups·16,) scales and zero points per activation group and lane (rows
    past the weight's end: all zero). codes32: the code bytes read 4 at a time. Every offset is a
    multiple of 4 columns (act_group), so 4 planar q4 code bytes give the low nibbles of 4
    consecutive columns by one mask and the high nibbles of 4 others by a shift and a mask; the
    other widths unpack a group into gb (uint8, a padded group's codes) in column order first,
    then go as q8's words do."""
    rows, n_groups = scales.shape
    n_agroups = sb.size // LANES
    n_full = k // group
    n_rows = min(LANES, rows - r0)
    if n_rows < LANES or n_full < n_groups or bits not in (4, 8):  # bytes left unwritten or or-ed into
        wb32[:] = 0
        sb[:] = 0.0
        zb[:] = 0
    mid = np.int32(1 << (bits - 1))
    gwords = group * bits // 32
    low = np.uint32(0x0F0F0F0F)
    for lane in range(n_rows):
        r = r0 + lane
        crow = codes32[r]
        for a in range(n_agroups):  # an activation group lies inside one weight group
            g = a * agroup // group
            sb[a * LANES + lane] = h2f[scales[r, g]]
            zb[a * LANES + lane] = np.int32(zeros[r, g]) if has_zeros else mid
        for g in range(n_groups):
            plen = group if g < n_full else (k - n_full * group + 7) // 8 * 8
            step0 = g * group // 4
            if bits == 8:
                for j in range((plen + 3) // 4):
                    wb32[(step0 + j) * LANES + lane] = crow[g * gwords + j]
            elif bits == 4:  # planar nibbles: byte j holds column j (low) and column plen/2 + j (high)
                half = plen // 8  # in words
                for j in range(half):
                    w = crow[g * gwords + j]
                    wb32[(step0 + j) * LANES + lane] = w & low
                    wb32[(step0 + half + j) * LANES + lane] = (w >> np.uint32(4)) & low
            else:  # planes of 4, 2 and 1 bits (spec §5)
                _unpack_planes(crow.view(np.uint8), g * (group * bits // 8), plen, bits, gb)
                words = gb.view(np.uint32)
                for j in range(plen // 4):
                    wb32[(step0 + j) * LANES + lane] = words[j]


@intrinsic
def _tile(typingctx, wb, sb, zb, xq, d, sums, t0, n_groups, steps_per_group, acc_out):
    """acc_out (TOKENS·16,) f32 = the block's products for tokens t0..t0+TOKENS-1 (module
    docstring): wb, sb, zb from _unpack_block; xq (n, W) int8, d and sums (n, n_groups)."""
    sig = types.void(wb, sb, zb, xq, d, sums, t0, n_groups, steps_per_group, acc_out)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in range(6)]
        w_ptr, s_ptr, z_ptr, x_ptr, d_ptr, sum_ptr = (a.data for a in arrays)
        t0_v, n_groups_v, spg_v = args[6], args[7], args[8]
        out_ptr = context.make_array(signature.args[9])(context, builder, args[9]).data
        i64 = t0_v.type
        row_bytes = cgutils.unpack_tuple(builder, arrays[3].strides, 2)[0]  # xq's row stride
        vnni = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]),
                                              "llvm.x86.avx512.vpdpbusd.512")

        def splat(value, vtype):
            v = builder.insert_element(ir.Constant(vtype, None), value, ir.Constant(_I32, 0))
            return builder.shuffle_vector(v, ir.Constant(vtype, None), ir.Constant(_V16, [0] * 16))

        def vload(ptr, offset, vtype):
            return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vtype.as_pointer()), align=1)

        tokens = [builder.add(t0_v, ir.Constant(i64, t)) for t in range(TOKENS)]
        x_rows = [builder.gep(x_ptr, [builder.mul(t, row_bytes)]) for t in tokens]
        acc = [cgutils.alloca_once(builder, _V16) for _ in range(TOKENS)]
        facc = [cgutils.alloca_once(builder, _F16V) for _ in range(TOKENS)]
        for f in facc:
            builder.store(ir.Constant(_F16V, [0.0] * 16), f)
        with cgutils.for_range(builder, n_groups_v) as groups:
            g = groups.index
            lane0 = builder.mul(g, ir.Constant(i64, LANES))
            zv = vload(z_ptr, lane0, _V16)
            tg = [builder.add(builder.mul(t, n_groups_v), g) for t in tokens]
            for t in range(TOKENS):  # start at -z·Σa: the zero point's part, in integers
                asum = splat(builder.load(builder.gep(sum_ptr, [tg[t]])), _V16)
                builder.store(builder.sub(ir.Constant(_V16, [0] * 16), builder.mul(zv, asum)), acc[t])
            step0 = builder.mul(g, spg_v)
            with cgutils.for_range(builder, spg_v) as steps:
                step = builder.add(step0, steps.index)
                w = builder.bitcast(vload(w_ptr, builder.mul(step, ir.Constant(i64, 64)), _B64), _V16)
                col = builder.mul(step, ir.Constant(i64, 4))
                for t in range(TOKENS):
                    a4 = builder.load(builder.bitcast(builder.gep(x_rows[t], [col]), _I32.as_pointer()), align=1)
                    builder.store(builder.call(vnni, [builder.load(acc[t]), w, splat(a4, _V16)]), acc[t])
            sv = vload(s_ptr, lane0, _F16V)
            for t in range(TOKENS):
                f = builder.fmul(sv, splat(builder.load(builder.gep(d_ptr, [tg[t]])), _F16V))
                prod = builder.fmul(builder.sitofp(builder.load(acc[t]), _F16V), f)
                builder.store(builder.fadd(builder.load(facc[t]), prod), facc[t])
        for t in range(TOKENS):
            dst = builder.gep(out_ptr, [ir.Constant(i64, t * LANES)])
            builder.store(builder.load(facc[t]), builder.bitcast(dst, _F16V.as_pointer()), align=4)
    return sig, codegen


@njit(cache=True, nogil=True)
def _gemm_part(codes32, scales, zeros, has_zeros, h2f, bits, k, group, agroup, xq, d, sums, n,
               worker, n_workers, wb, sb, zb, gb, tile, out):
    """Row blocks worker, worker + n_workers, ... of gemm_q8act (one thread; wb, sb, zb, gb, tile
    its scratch)."""
    rows = scales.shape[0]
    n_groups = d.shape[1]  # activation groups from here on
    steps_per_group = agroup // 4
    n_blocks = (rows + LANES - 1) // LANES
    for b in range(worker, n_blocks, n_workers):
        r0 = b * LANES
        _unpack_block(codes32, scales, zeros, has_zeros, h2f, bits, k, group, agroup, r0, wb.view(np.uint32), sb, zb,
                      gb)
        n_rows = min(LANES, rows - r0)
        for t0 in range(0, xq.shape[0], TOKENS):
            _tile(wb, sb, zb, xq, d, sums, t0, n_groups, steps_per_group, tile)
            for t in range(min(TOKENS, n - t0)):
                for lane in range(n_rows):
                    out[t0 + t, r0 + lane] = tile[t * LANES + lane]


def gemm_q8act(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, has_zeros: bool,
               h2f: np.ndarray, bits: int, k: int, group: int, agroup: int, x: np.ndarray) -> np.ndarray:
    """x (n, k) float32 @ W.T for `bits`-bit codes (2 to 6, or 8) in groups of `group` columns, the
    activations quantized per `agroup` columns (act_group's choice)."""
    n = x.shape[0]
    n_groups = -(-k // agroup)
    n_pad = -(-n // TOKENS) * TOKENS
    xq = np.zeros((n_pad, n_groups * agroup), np.int8)
    d = np.zeros((n_pad, n_groups), np.float32)
    sums = np.zeros((n_pad, n_groups), np.int32)
    run_row_chunks(lambda t: quantize_rows(x[t], k, agroup, xq[t], d[t], sums[t]), n, min_rows=64)
    return gemm_codes(codes, scales, zeros, has_zeros, h2f, bits, k, group, agroup, xq, d, sums, n)


def per_token_input(xq: np.ndarray, d: np.ndarray, k: int, agroup: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations quantized with one scale per token (W8A8: xq (n, k) int8, d (n,)) in
    gemm_codes's layout: every activation group of a token carries the token's scale."""
    n = xq.shape[0]
    n_groups = -(-k // agroup)
    n_pad = -(-n // TOKENS) * TOKENS
    xg = np.zeros((n_pad, n_groups * agroup), np.int8)
    xg[:n, :k] = xq
    dg = np.zeros((n_pad, n_groups), np.float32)
    dg[:n] = d[:, None]
    sums = xg.reshape(n_pad, n_groups, agroup).sum(axis=2, dtype=np.int32)
    return xg, dg, sums


def gemm_codes(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, has_zeros: bool,
               h2f: np.ndarray, bits: int, k: int, group: int, agroup: int, xq: np.ndarray,
               d: np.ndarray, sums: np.ndarray, n: int) -> np.ndarray:
    """out (n, rows) from activations already quantized (xq (n_pad, W) int8, d and sums
    (n_pad, W / agroup); n_pad a multiple of TOKENS, W = ceil(k / agroup)·agroup, zero past k).
    Row blocks are spread over the kernel threads by threads.run_tasks: numba's own pool would
    spin after the call and slow the BLAS-bound attention that follows on the same cores."""
    n_groups = d.shape[1]
    codes32 = np.ascontiguousarray(codes).view(np.uint32)  # rows are whole words (act_group)
    out = np.empty((n, scales.shape[0]), np.float32)
    n_workers = max(1, min(numba.get_num_threads(), -(-scales.shape[0] // LANES)))

    def part(worker: int) -> None:
        wb = np.empty(xq.shape[1] * LANES, np.uint8)
        sb = np.empty(n_groups * LANES, np.float32)
        zb = np.empty(n_groups * LANES, np.int32)
        gb = np.empty(-(-group // 8) * 8, np.uint8)  # one group's codes, padded as the planes are
        tile = np.empty(TOKENS * LANES, np.float32)
        _gemm_part(codes32, scales, zeros, has_zeros, h2f, bits, k, group, agroup, xq, d, sums, n,
                   worker, n_workers, wb, sb, zb, gb, tile, out)

    run_tasks(part, range(n_workers))
    return out
