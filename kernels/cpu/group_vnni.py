"""Dense grouped rows of 2 to 6 bits (q2, q3, q4, q5, q6) times int8 activations through
AVX512-VNNI, for groups of a multiple of 64 columns.

Codes are stored in planes of 4, 2 or 1 bits (spec §5): a plane of width w holds, in each of
its G·w/8 bytes, one field of each of its 8/w slices of G·w/8 columns. Per 64 columns of a plane
the kernel loads 8·w bytes, repeats them 8/w times across a 64-byte vector and shifts each
64-bit lane by its field's offset (one broadcast, one variable shift and one mask for all
fields), shifts the fields to their place in the code (at most 63 < 256: still unsigned bytes),
and meets the 64 activations of those fields' columns (one 64-byte load in groups of 64
columns, whose slices are contiguous; else 8/w loads) in one vpdpbusd (unsigned codes times
signed activations). Every plane of a group accumulates into the
same 16 int32 lanes, which start from the zero point's part -z_g·Σ xq_g in lane 0 (exact in
integers), and the group's s_g·d_g scales them in float (the float16 scale widened in the
vector unit); one horizontal sum per row. For q4 that is one 32-byte load of nibbles [low |
high] meeting [xq[32c:32c+32] | xq[G/2+32c:G/2+32c+32]]; a q6 group costs 1.5 times a q4 group,
a q3 group 1.5 times a q2 one.

The work is done in tiles (_tile_dot): four rows of one token (rows: the decode GEMV), or two
rows of four tokens (rows_tokens: a batched decode step), so that a token's activations are
loaded once for every row of the tile and a row's fields split once for every token, and the
core has four or eight independent chains of vpdpbusd and float adds instead of one. Each (row, token) value is
computed by the same operations in the same order whatever the tile, so a batched step's
numbers are bit for bit the one-token GEMV's.

A row's last, partial group takes the same path when its length is a multiple of 64 (576 =
4·128 + 64 columns in groups of 128); otherwise the portable kernel adds it. The integer sums
per group are exact; the float sums differ from the portable kernel's in rounding order only.
(Software prefetch of the next rows measured no gain: rows are one sequential stream, which the
hardware prefetchers follow.) Compiled only on CPUs with AVX512-VNNI and AVX512-BW
(features.VNNI_BW).
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qformat.packing import planes


_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_V16 = ir.VectorType(_I32, 16)
_Q8 = ir.VectorType(ir.IntType(64), 8)
_B64 = ir.VectorType(_I8, 64)
_F16 = ir.VectorType(_F32, 16)


def _concat(builder, parts):
    """One vector of the byte vectors `parts` (equal widths, a power of two in number), in order."""
    while len(parts) > 1:
        width = parts[0].type.count
        idx = ir.Constant(ir.VectorType(_I32, 2 * width), list(range(2 * width)))
        parts = [builder.shuffle_vector(a, b, idx) for a, b in zip(parts[0::2], parts[1::2])]
    return parts[0]


def split_fields(builder, plane, width: int, shift: int):
    """The 64 fields of a plane's 8·width bytes `plane` (<8·width x i8>) as one <64 x i8>: field i
    of every byte into bytes i·8·width.., shifted left by `shift` (its place in the code). The
    plane repeated 8/width times, each 64-bit lane shifted right by its field's offset (w·i + w
    <= 8, so what the shift brings in from the next byte is masked off): one broadcast, one
    variable shift and one mask for all fields."""
    per = 8 * width
    wide = builder.shuffle_vector(plane, plane, ir.Constant(ir.VectorType(_I32, 64), [j % per for j in range(64)]))
    lanes = builder.lshr(builder.bitcast(wide, _Q8), ir.Constant(_Q8, [width * (8 * q // per) for q in range(8)]))
    f = builder.and_(builder.bitcast(lanes, _B64), ir.Constant(_B64, [(1 << width) - 1] * 64))
    return builder.shl(f, ir.Constant(_B64, [shift] * 64)) if shift else f


def _emit_tile_dot(context, builder, signature, args, bits, nr, nt, has_zeros):
    """Code of _tile_dot for `bits`-bit codes, nr rows, nt tokens and stored zero points or not
    (compile-time constants). Per (row, token) the same operations in the same order as for one
    row and one token, so every result is bit for bit the one-row, one-token kernel's: tiling
    only shares the loads (a row's codes are split once for all tokens, a token's activations
    loaded once for all rows) and gives the core nr·nt independent chains."""
    arrays = {i: context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 3, 4, 5, 6, 7)}
    codes, scales, zeros, xq, d, sums = (arrays[i] for i in (0, 3, 4, 5, 6, 7))
    codes_t, scales_t, zeros_t, xq_t, d_t, sums_t = (signature.args[i] for i in (0, 3, 4, 5, 6, 7))
    r0_v, t0_v, n_full_v, group_v, tail_v = args[1], args[2], args[8], args[9], args[10]
    i64 = n_full_v.type
    vnni = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]),
                                          "llvm.x86.avx512.vpdpbusd.512")

    def const(n):
        return ir.Constant(i64, n)

    def item(ary, ty, *inds):
        return cgutils.get_item_pointer(context, builder, ty, ary, list(inds), wraparound=False)

    def load(ptr, n):
        return builder.load(builder.bitcast(ptr, ir.VectorType(_I8, n).as_pointer()), align=1)

    def splat(value, vec):
        one = builder.insert_element(ir.Constant(vec, None), value, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(vec, None), ir.Constant(ir.VectorType(_I32, 16), [0] * 16))

    rows = [builder.add(r0_v, const(i)) for i in range(nr)]
    tokens = [builder.add(t0_v, const(t)) for t in range(nt)]

    def groups_pass(g0, n_groups, glen):
        """Each (row, token)'s float sum over groups g0 .. g0+n_groups-1 of glen columns."""
        facc = [[cgutils.alloca_once(builder, _F16) for _ in range(nt)] for _ in range(nr)]
        dot = [[cgutils.alloca_once(builder, _V16) for _ in range(nt)] for _ in range(nr)]
        for row in facc:
            for acc in row:
                builder.store(ir.Constant(_F16, [0.0] * 16), acc)
        chunks = builder.sdiv(glen, const(64))
        whole = builder.icmp_signed("==", glen, const(64))
        with cgutils.for_range(builder, n_groups) as groups:
            g = builder.add(g0, groups.index)
            # the zero point's part, -z·Σ xq, in lane 0 of the integer sums: exact, and one
            # float scaling for the whole group
            for i, r in enumerate(rows):
                z = (builder.zext(builder.load(item(zeros, zeros_t, r, g)), _I32) if has_zeros
                     else ir.Constant(_I32, 1 << (bits - 1)))
                for j, t in enumerate(tokens):
                    corr = builder.neg(builder.mul(z, builder.load(item(sums, sums_t, t, g))))
                    builder.store(builder.insert_element(ir.Constant(_V16, [0] * 16), corr, ir.Constant(_I32, 0)),
                                  dot[i][j])
            plane0 = builder.sdiv(builder.mul(builder.mul(g, group_v), const(bits)), const(8))  # the group's bytes
            shift = 0
            for width in planes(bits):
                slices, per = 8 // width, 8 * width  # per: plane bytes per 64 columns
                stride = builder.sdiv(builder.mul(glen, const(width)), const(8))  # columns per slice
                with cgutils.for_range(builder, chunks) as loop:
                    b0 = builder.mul(loop.index, const(per))
                    ws = []
                    for r in rows:
                        plane = load(item(codes, codes_t, r, builder.add(plane0, b0)), per)
                        ws.append(builder.bitcast(split_fields(builder, plane, width, shift), _V16))
                    acts = []
                    for t in tokens:
                        # a group of 64 columns: its slices are contiguous, one 64-byte load
                        with builder.if_else(whole) as (one_load, slice_loads):
                            with one_load:
                                whole_x = load(item(xq, xq_t, t, g, b0), 64)
                                one_block = builder.basic_block
                            with slice_loads:
                                parts = [load(item(xq, xq_t, t, g, builder.add(builder.mul(stride, const(i)), b0)),
                                              per) for i in range(slices)]
                                sliced_x = _concat(builder, parts)
                                slices_block = builder.basic_block
                        x = builder.phi(_B64)
                        x.add_incoming(whole_x, one_block)
                        x.add_incoming(sliced_x, slices_block)
                        acts.append(builder.bitcast(x, _V16))
                    for i, w in enumerate(ws):
                        for j, x in enumerate(acts):
                            builder.store(builder.call(vnni, [builder.load(dot[i][j]), w, x]), dot[i][j])
                plane0 = builder.add(plane0, stride)
                shift += width
            ds = [builder.load(item(d, d_t, t, g)) for t in tokens]
            for i, r in enumerate(rows):
                half = builder.bitcast(builder.load(item(scales, scales_t, r, g)), ir.HalfType())
                sv = builder.fpext(half, _F32)  # exactly the float16 scale's value
                for j, dv in enumerate(ds):
                    scaled = builder.fmul(builder.sitofp(builder.load(dot[i][j]), _F16),
                                          splat(builder.fmul(sv, dv), _F16))
                    builder.store(builder.fadd(builder.load(facc[i][j]), scaled), facc[i][j])
        out = []
        for row in facc:
            for acc in row:
                v = builder.load(acc)
                width = 16
                while width > 1:  # pairwise halves: 4 shuffles and adds instead of 15 ordered adds
                    width //= 2
                    idx = ir.VectorType(_I32, width)
                    lo_half = builder.shuffle_vector(v, v, ir.Constant(idx, list(range(width))))
                    hi_half = builder.shuffle_vector(v, v, ir.Constant(idx, list(range(width, 2 * width))))
                    v = builder.fadd(lo_half, hi_half)
                out.append(builder.extract_element(v, ir.Constant(_I32, 0)))
        return out

    full = groups_pass(const(0), n_full_v, group_v)
    # a partial last group of `tail` columns: its own sum, added to the full groups' (no group
    # runs when tail is 0, and the full sum is then kept as it is)
    has_tail = builder.icmp_signed("!=", tail_v, const(0))
    last = groups_pass(n_full_v, builder.zext(has_tail, i64), tail_v)
    results = [builder.select(has_tail, builder.fadd(f, t), f) for f, t in zip(full, last)]
    return context.make_tuple(builder, signature.return_type, results)


@intrinsic
def _tile_dot(typingctx, codes, r0, t0, scales, zeros, xq, d, sums, n_full, group, tail, bits, nr, nt, has_zeros):
    """(value (0, 0), (0, 1), .., (nr-1, nt-1)): value (i, j) = Σ_g s[r0+i, g]·d[t0+j, g]·
    (Σ_c code(r0+i, g, c)·xq[t0+j, g, c] - z[r0+i, g]·sums[t0+j, g]) over the n_full groups of
    `group` columns (a multiple of 64), plus, when tail != 0, the partial last group of `tail`
    columns (a multiple of 64) summed apart, for nr rows and nt tokens: codes (rows, row bytes),
    scales (rows, groups) float16 bits, zeros (rows, groups) uint8 (has_zeros) or the grid's
    middle 2**(bits-1), xq (tokens, groups, P) int8 activations, d (tokens, groups) and sums
    (tokens, groups) as quantize_x gives them; bits, nr, nt and has_zeros literals."""
    literals = (bits, nr, nt)
    if not all(isinstance(v, types.IntegerLiteral) for v in literals) or not isinstance(has_zeros, types.BooleanLiteral):
        return None
    width, n_rows, n_tokens = (v.literal_value for v in literals)
    stored = has_zeros.literal_value
    sig = types.UniTuple(types.float32, n_rows * n_tokens)(codes, r0, t0, scales, zeros, xq, d, sums, n_full, group,
                                                            tail, bits, nr, nt, has_zeros)
    return sig, lambda context, builder, signature, args: _emit_tile_dot(context, builder, signature, args, width,
                                                                         n_rows, n_tokens, stored)


@njit(cache=True, inline="always")
def _tile_z(codes, r0, t0, scales, zeros, xq, d, sums, n_full, group, tail, bits, nr, nt, has_zeros):
    """_tile_dot with has_zeros as a literal."""
    if has_zeros:
        return _tile_dot(codes, r0, t0, scales, zeros, xq, d, sums, n_full, group, tail, bits, nr, nt, True)
    return _tile_dot(codes, r0, t0, scales, zeros, xq, d, sums, n_full, group, tail, bits, nr, nt, False)


@njit(cache=True, inline="always")
def _tile(codes, r0, t0, scales, zeros, has_zeros, xq, d, sums, n_full, group, tail, bits, nr, nt):
    """_tile_dot with `bits` and has_zeros as literals (the intrinsic compiles one body per
    width and zero-point form); nr, nt literals already."""
    if bits == 4:
        return _tile_z(codes, r0, t0, scales, zeros, xq, d, sums, n_full, group, tail, 4, nr, nt, has_zeros)
    if bits == 2:
        return _tile_z(codes, r0, t0, scales, zeros, xq, d, sums, n_full, group, tail, 2, nr, nt, has_zeros)
    if bits == 3:
        return _tile_z(codes, r0, t0, scales, zeros, xq, d, sums, n_full, group, tail, 3, nr, nt, has_zeros)
    if bits == 5:
        return _tile_z(codes, r0, t0, scales, zeros, xq, d, sums, n_full, group, tail, 5, nr, nt, has_zeros)
    return _tile_z(codes, r0, t0, scales, zeros, xq, d, sums, n_full, group, tail, 6, nr, nt, has_zeros)


@njit(cache=True, inline="always")
def _vnni_groups(k, group):
    """(full groups, the partial last group's columns when this kernel takes it (a multiple of
    64) else 0, the number of groups done)."""
    n_full = k // group
    tail = k - n_full * group
    if tail % 64 != 0:
        tail = 0
    return n_full, tail, n_full + (1 if tail else 0)


# Rows per tile of the one-token GEMV, tokens per tile of the batched one (of two rows: 16
# accumulators and 6 operands fit the 32 vector registers; measured 1.35x one row of four).
ROW_TILE = 4
TOKEN_TILE = 4


@njit(cache=True)
def rows(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, r0, r1, out):
    """out[r0:r1] = the part of W @ x of the full groups (group % 64 == 0) and of a partial last
    group of a multiple of 64 columns; xq (n_groups, group) as quant.quantize_x returns it; four
    rows at a time (_tile_dot). Returns the number of groups done. Allocates nothing: an
    allocation per parallel task made two threads slower than one. (h2f: the portable kernels'
    scale table, unused: the scales widen in the vector unit.)"""
    n_full, tail, done = _vnni_groups(k, group)
    x3 = xq.reshape((1, xq.shape[0], xq.shape[1]))
    d2 = d.reshape((1, d.size))
    s2 = sums.reshape((1, sums.size))
    r = r0
    while r + ROW_TILE <= r1:
        out[r], out[r + 1], out[r + 2], out[r + 3] = _tile(codes, r, 0, scales, zeros, has_zeros, x3, d2, s2, n_full,
                                                           group, tail, bits, ROW_TILE, 1)
        r += ROW_TILE
    for r in range(r, r1):
        (v,) = _tile(codes, r, 0, scales, zeros, has_zeros, x3, d2, s2, n_full, group, tail, bits, 1, 1)
        out[r] = v
    return done


@njit(cache=True)
def rows_tokens(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, r0, r1, out):
    """rows() for n tokens at once (batched decode): out[t, r0:r1] for xq (n, n_groups, P), d and
    sums (n, n_groups) as quant.quantize_rows returns them, in tiles of two rows and TOKEN_TILE
    tokens (each row's codes split once for four tokens, each token's activations loaded once
    for two rows); every value bit for bit rows()'s for that token alone. Returns the number of
    groups done."""
    n = xq.shape[0]
    n_full, tail, done = _vnni_groups(k, group)
    r = r0
    while r + 2 <= r1:  # two rows of four tokens: 8 accumulators, 6 operands
        t = 0
        while t + TOKEN_TILE <= n:
            v = _tile(codes, r, t, scales, zeros, has_zeros, xq, d, sums, n_full, group, tail, bits, 2, TOKEN_TILE)
            out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = v[0], v[1], v[2], v[3]
            out[t, r + 1], out[t + 1, r + 1], out[t + 2, r + 1], out[t + 3, r + 1] = v[4], v[5], v[6], v[7]
            t += TOKEN_TILE
        for t in range(t, n):
            out[t, r], out[t, r + 1] = _tile(codes, r, t, scales, zeros, has_zeros, xq, d, sums, n_full, group, tail,
                                             bits, 2, 1)
        r += 2
    for r in range(r, r1):
        t = 0
        while t + TOKEN_TILE <= n:
            out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = _tile(codes, r, t, scales, zeros, has_zeros, xq,
                                                                           d, sums, n_full, group, tail, bits, 1,
                                                                           TOKEN_TILE)
            t += TOKEN_TILE
        for t in range(t, n):
            (v,) = _tile(codes, r, t, scales, zeros, has_zeros, xq, d, sums, n_full, group, tail, bits, 1, 1)
            out[t, r] = v
    return done
