"""Dense q4 rows times int8 activations through AVX512-VNNI (groups of 64k columns).

The portable kernel (quant._rows_q4_q8act) multiplies int16 pairs and reduces every group to a
scalar. Here a group's code bytes are read 32 at a time: their low nibbles are columns
32c..32c+31 of the chunk and their high nibbles the columns half a group further (the planar
packing of spec §5), so one 64-byte vector of codes [low | high] meets the 64 activation bytes
[xq[32c:32c+32] | xq[G/2+32c:G/2+32c+32]] in one vpdpbusd (unsigned codes times signed
activations). The group's 16 int32 partial sums are scaled by s_g·d_g in float lanes and summed
over the row's groups; one horizontal sum per row. The zero-points' part, z_g·d_g·s_g·Σ xq_g, is
a scalar per group, as in the portable kernel. Only groups of a multiple of 64 columns take this
path; the integer sums per group are exact, the float sums differ from the portable kernel's
in rounding order only. (Software prefetch of the next rows measured no gain: rows are one
sequential stream, which the hardware prefetchers follow.)
Compiled only on CPUs with AVX512-VNNI and AVX512-BW (features.VNNI_BW).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .base import FAST

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_B32 = ir.VectorType(_I8, 32)
_V16 = ir.VectorType(_I32, 16)
_F16 = ir.VectorType(_F32, 16)


@intrinsic
def _row_dot(typingctx, crow, xq, srow, h2f, d, n_groups, group):
    """Σ_g h2f[srow[g]]·d[g]·Σ_j code_j·xq[g, j] over the first n_groups full groups of `group`
    columns (a multiple of 64): crow one row's code bytes, xq (n_groups, group) int8
    activations, srow the row's float16 scale bits, h2f their float32 values, d (n_groups,)."""
    sig = types.float32(crow, xq, srow, h2f, d, n_groups, group)

    def codegen(context, builder, signature, args):
        c_ptr, x_ptr, s_ptr, h_ptr, d_ptr = (context.make_array(signature.args[i])(context, builder, args[i]).data
                                             for i in range(5))
        n_groups_v, group_v = args[5], args[6]
        i64 = n_groups_v.type
        vnni = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]),
                                              "llvm.x86.avx512.vpdpbusd.512")
        facc = cgutils.alloca_once(builder, _F16)
        builder.store(ir.Constant(_F16, [0.0] * 16), facc)
        dot = cgutils.alloca_once(builder, _V16)
        half = builder.sdiv(group_v, ir.Constant(i64, 2))
        chunks = builder.sdiv(group_v, ir.Constant(i64, 64))
        concat = ir.Constant(ir.VectorType(_I32, 64), list(range(64)))

        def load32(ptr, offset):
            return builder.load(builder.bitcast(builder.gep(ptr, [offset]), _B32.as_pointer()), align=1)

        with cgutils.for_range(builder, n_groups_v) as groups:
            g = groups.index
            builder.store(ir.Constant(_V16, [0] * 16), dot)
            code0 = builder.mul(g, half)
            act0 = builder.mul(g, group_v)
            with cgutils.for_range(builder, chunks) as loop:
                c32 = builder.mul(loop.index, ir.Constant(i64, 32))
                codes = load32(c_ptr, builder.add(code0, c32))
                low = builder.and_(codes, ir.Constant(_B32, [15] * 32))
                high = builder.lshr(codes, ir.Constant(_B32, [4] * 32))
                w = builder.shuffle_vector(low, high, concat)
                a_lo = load32(x_ptr, builder.add(act0, c32))
                a_hi = load32(x_ptr, builder.add(builder.add(act0, half), c32))
                a = builder.shuffle_vector(a_lo, a_hi, concat)
                builder.store(builder.call(vnni, [builder.load(dot), builder.bitcast(w, _V16),
                                                  builder.bitcast(a, _V16)]), dot)
            bits = builder.zext(builder.load(builder.gep(s_ptr, [g])), i64)
            f = builder.fmul(builder.load(builder.gep(h_ptr, [bits])), builder.load(builder.gep(d_ptr, [g])))
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
    return sig, codegen


@njit(cache=True, fastmath=FAST)
def rows(codes, scales, zeros, has_zeros, h2f, lo, hi, xq, d, sums, k, group, r0, r1, out):
    """quant._rows_q4_q8act (out[r0:r1] = the full groups' part of W @ x) for group % 64 == 0,
    on vpdpbusd; xq (n_groups, group) as quant.quantize_x returns it (lo, hi unused: the
    portable kernel's arguments). Allocates nothing: an allocation per parallel task made two
    threads slower than one."""
    n_full = k // group
    for r in range(r0, r1):
        srow = scales[r]
        corr = np.float32(0.0)
        for g in range(n_full):
            z = np.int32(zeros[r, g]) if has_zeros else np.int32(8)
            corr += h2f[srow[g]] * d[g] * np.float32(z * sums[g])
        out[r] = _row_dot(codes[r], xq, srow, h2f, d, n_full, group) - corr
