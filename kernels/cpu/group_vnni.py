"""Dense grouped rows of 2 to 6 bits (q2, q3, q4, q5, q6) times int8 activations through
AVX512-VNNI, for groups of a multiple of 64 columns.

Codes are stored in planes of 4, 2 or 1 bits (spec §5): a plane of width w holds, in each of
its G·w/8 bytes, one field of each of its 8/w slices of G·w/8 columns. Per 64 columns of a plane
the kernel loads 8·w bytes, splits them field by field (one shift and one mask per slice) into
a 64-byte vector of fields shifted to their place in the code (at most 63 < 256: still unsigned
bytes), and meets the 64 activations of those fields' columns (8/w contiguous loads) in one
vpdpbusd (unsigned codes times signed activations). Every plane of a group accumulates into the
same 16 int32 lanes, which the group's s_g·d_g scales in float; one horizontal sum per row.
For q4 that is one 32-byte load of nibbles [low | high] meeting [xq[32c:32c+32] |
xq[G/2+32c:G/2+32c+32]]; a q6 group costs 1.5 times a q4 group, a q3 group 1.5 times a q2 one.
The zero points' part, z_g·d_g·s_g·Σ xq_g, is a scalar per group, as in the portable kernels.

A row's last, partial group takes the same path when its length is a multiple of 64 (576 =
4·128 + 64 columns in groups of 128); otherwise the portable kernel adds it. The integer sums
per group are exact; the float sums differ from the portable kernel's in rounding order only.
(Software prefetch of the next rows measured no gain: rows are one sequential stream, which the
hardware prefetchers follow.) Compiled only on CPUs with AVX512-VNNI and AVX512-BW
(features.VNNI_BW).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qformat.packing import planes

from .base import FAST

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_V16 = ir.VectorType(_I32, 16)
_F16 = ir.VectorType(_F32, 16)


def _concat(builder, parts):
    """One vector of the byte vectors `parts` (equal widths, a power of two in number), in order."""
    while len(parts) > 1:
        width = parts[0].type.count
        idx = ir.Constant(ir.VectorType(_I32, 2 * width), list(range(2 * width)))
        parts = [builder.shuffle_vector(a, b, idx) for a, b in zip(parts[0::2], parts[1::2])]
    return parts[0]


def _emit_row_dot(context, builder, signature, args, bits):
    """Code of _row_dot for `bits`-bit codes (a compile-time constant)."""
    c_ptr, x_ptr, s_ptr, h_ptr, d_ptr = (context.make_array(signature.args[i])(context, builder, args[i]).data
                                         for i in range(5))
    n_groups_v, group_v = args[5], args[6]
    i64 = n_groups_v.type
    vnni = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]),
                                          "llvm.x86.avx512.vpdpbusd.512")
    facc = cgutils.alloca_once(builder, _F16)
    builder.store(ir.Constant(_F16, [0.0] * 16), facc)
    dot = cgutils.alloca_once(builder, _V16)
    chunks = builder.sdiv(group_v, ir.Constant(i64, 64))

    def const(n):
        return ir.Constant(i64, n)

    def load(ptr, offset, n):
        vec = ir.VectorType(_I8, n)
        return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vec.as_pointer()), align=1)

    with cgutils.for_range(builder, n_groups_v) as groups:
        g = groups.index
        builder.store(ir.Constant(_V16, [0] * 16), dot)
        plane0 = builder.sdiv(builder.mul(builder.mul(g, group_v), const(bits)), const(8))  # the group's bytes
        act0 = builder.mul(g, group_v)
        shift = 0
        for width in planes(bits):
            slices, per = 8 // width, 8 * width  # per: plane bytes per 64 columns
            vec = ir.VectorType(_I8, per)
            stride = builder.sdiv(builder.mul(group_v, const(width)), const(8))  # columns per slice
            with cgutils.for_range(builder, chunks) as loop:
                b0 = builder.mul(loop.index, const(per))
                plane = load(c_ptr, builder.add(plane0, b0), per)
                fields = []
                for i in range(slices):
                    f = builder.and_(builder.lshr(plane, ir.Constant(vec, [width * i] * per)),
                                     ir.Constant(vec, [(1 << width) - 1] * per))
                    fields.append(builder.shl(f, ir.Constant(vec, [shift] * per)) if shift else f)
                acts = [load(x_ptr, builder.add(builder.add(act0, builder.mul(stride, const(i))), b0), per)
                        for i in range(slices)]
                w, a = _concat(builder, fields), _concat(builder, acts)
                builder.store(builder.call(vnni, [builder.load(dot), builder.bitcast(w, _V16),
                                                  builder.bitcast(a, _V16)]), dot)
            plane0 = builder.add(plane0, stride)
            shift += width
        sbits = builder.zext(builder.load(builder.gep(s_ptr, [g])), i64)
        f = builder.fmul(builder.load(builder.gep(h_ptr, [sbits])), builder.load(builder.gep(d_ptr, [g])))
        fs = builder.shuffle_vector(builder.insert_element(ir.Constant(_F16, None), f, ir.Constant(_I32, 0)),
                                    ir.Constant(_F16, None), ir.Constant(ir.VectorType(_I32, 16), [0] * 16))
        scaled = builder.fmul(builder.sitofp(builder.load(dot), _F16), fs)
        builder.store(builder.fadd(builder.load(facc), scaled), facc)
    v = builder.load(facc)
    width = 16
    while width > 1:  # pairwise halves: 4 shuffles and adds instead of 15 ordered adds
        width //= 2
        idx = ir.VectorType(_I32, width)
        lo_half = builder.shuffle_vector(v, v, ir.Constant(idx, list(range(width))))
        hi_half = builder.shuffle_vector(v, v, ir.Constant(idx, list(range(width, 2 * width))))
        v = builder.fadd(lo_half, hi_half)
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def _row_dot(typingctx, crow, xq, srow, h2f, d, n_groups, group, bits):
    """Σ_g h2f[srow[g]]·d[g]·Σ_j code_j·xq[g, j] over the first n_groups groups of `group`
    columns (a multiple of 64): crow the groups' code bytes, xq (n_groups, group) int8
    activations, srow their float16 scale bits, h2f those bits' float32 values, d (n_groups,);
    bits a literal 2 to 6."""
    if not isinstance(bits, types.IntegerLiteral):
        return None
    width = bits.literal_value
    sig = types.float32(crow, xq, srow, h2f, d, n_groups, group, bits)
    return sig, lambda context, builder, signature, args: _emit_row_dot(context, builder, signature, args, width)


@njit(cache=True, inline="always")
def _dot(crow, xq, srow, h2f, d, n_groups, group, bits):
    """_row_dot with `bits` as a literal (the intrinsic compiles one body per width)."""
    if bits == 4:
        return _row_dot(crow, xq, srow, h2f, d, n_groups, group, 4)
    if bits == 2:
        return _row_dot(crow, xq, srow, h2f, d, n_groups, group, 2)
    if bits == 3:
        return _row_dot(crow, xq, srow, h2f, d, n_groups, group, 3)
    if bits == 5:
        return _row_dot(crow, xq, srow, h2f, d, n_groups, group, 5)
    return _row_dot(crow, xq, srow, h2f, d, n_groups, group, 6)


@njit(cache=True, fastmath=FAST)
def rows(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, bits, r0, r1, out):
    """out[r0:r1] = the part of W @ x of the full groups (group % 64 == 0) and of a partial last
    group of a multiple of 64 columns; xq (n_groups, group) as quant.quantize_x returns it.
    Returns the number of groups done. Allocates nothing: an allocation per parallel task made
    two threads slower than one."""
    n_full = k // group
    tail = k - n_full * group
    done = n_full + (1 if tail and tail % 64 == 0 else 0)
    gbytes = group * bits // 8
    mid = np.int32(1 << (bits - 1))
    for r in range(r0, r1):
        srow = scales[r]
        corr = np.float32(0.0)
        for g in range(done):
            z = np.int32(zeros[r, g]) if has_zeros else mid
            corr += h2f[srow[g]] * d[g] * np.float32(z * sums[g])
        crow = codes[r]
        acc = _dot(crow, xq, srow, h2f, d, n_full, group, bits)
        if done > n_full:
            acc += _dot(crow[n_full * gbytes:], xq[n_full:], srow[n_full:], h2f, d[n_full:], 1, tail, bits)
        out[r] = acc - corr
    return done
