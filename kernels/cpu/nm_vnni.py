"""2:4 (n:4) sparse q4 tiles through AVX-512 bit-field and byte shuffles and VNNI dot products.

The portable tile kernel (sparse._tiles_n4) picks each kept value's int8 activation with a
variable shift and multiplies in int32 lanes: about 40 vector operations per 16 rows and 4 kept
values. Here, per step j of a tile's group and 16 rows (one 32-bit lane per row):

  table   the 4 slots' candidate activations of step j, 16 bytes (byte 4s + c = column c of the
          block in slot s), broadcast to every 128-bit lane;
  control byte s of a lane = 4s + p_s: vpmultishiftqb moves the lane's 2-bit positions to bytes;
  a       vpshufb(table, control): the lane's 4 kept values' activations, signed bytes;
  w       the lane's 4 codes as unsigned bytes (slot order: low nibbles of the two code bytes,
          then their high nibbles), also by vpmultishiftqb;
  dot     += vpdpbusd(w, a);  asum += vpdpbusd(1, a)   (Σ q·a and Σ a over kept values)

so the group's integer dot product is dot − z·asum, exactly the portable kernel's, in about 12
operations. After each group the 32 rows' float accumulators take s·d·(dot − z·asum), the
float16 scales widened by vcvtph2ps; a whole tile stays in registers and nothing is allocated
(an allocation per parallel task made two threads slower than one on 192-row layers). The tile
layout is sparse.py's (TILE = 32 rows: two halves of 16 lanes).
Compiled only on CPUs with AVX512-VNNI, -BW and -VBMI (features.VNNI_VBMI): the intrinsics are a
fatal LLVM error elsewhere.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .base import FAST


LANES = 16  # rows per 512-bit vector of int32 lanes
AHEAD = 8  # groups of a tile prefetched ahead (measured on streaming GEMVs: 2 < 4 < 8 > 16)
TILE = 32  # sparse.TILE: two vectors

_I8, _I32 = ir.IntType(8), ir.IntType(32)
_V16 = ir.VectorType(_I32, 16)
_V64 = ir.VectorType(_I8, 64)
_B16 = ir.VectorType(_I8, 16)
_V4 = ir.VectorType(_I32, 4)
_F16 = ir.VectorType(ir.FloatType(), 16)
_W8 = ir.VectorType(ir.IntType(16), 8)  # 16 index bytes as 8 pairs
_Q8 = ir.VectorType(ir.IntType(64), 8)
# vpmultishiftqb bit offsets (per qword = two lanes): the index pair's 2-bit fields 0, 2, 4, 6
# of the low byte, then 8, 10, 12, 14; the code pair's nibbles at bits 0, 8, 4, 12 (+32)
_SPREAD_INDEX = ir.Constant(_V64, [0, 2, 4, 6, 8, 10, 12, 14] * 8)
_SPREAD_CODES = ir.Constant(_V64, [0, 8, 4, 12, 32, 40, 36, 44] * 8)


def _splat(value: int) -> ir.Constant:
    return ir.Constant(_V16, [value] * 16)


@intrinsic
def _nm4_tile(typingctx, codes, index, table, scales, zeros, has_zeros, d, n_groups, steps, out, row0):
    """out[row0 + t] (t < 32, rows that exist) = Σ_g s_g[t]·d[g]·(Σ code·a − z_g[t]·Σ a) for one
    tile: codes (n_groups, 2L, 32) u8 (rows 0..L-1: slots 0 | 2 << 4, rows L..2L-1: slots 1 |
    3 << 4), index (n_groups, L, 32) u8 (slot s at bits 2s), table (n_groups, L, 4) int32 (slot
    s's candidates), scales (n_groups, 32) float16 bits, zeros (n_groups, 32) u8 when has_zeros
    (else 8), d (n_groups,) activation scales; steps = L. Everything stays in registers."""
    sig = types.none(codes, index, table, scales, zeros, has_zeros, d, n_groups, steps, out, row0)

    def codegen(context, builder, signature, args):
        c_ptr, i_ptr, t_ptr, s_ptr, z_ptr = (context.make_array(signature.args[i])(context, builder, args[i]).data
                                             for i in range(5))
        d_ptr = context.make_array(signature.args[6])(context, builder, args[6]).data
        out_arr = context.make_array(signature.args[9])(context, builder, args[9])
        out_ptr = out_arr.data
        n_rows = cgutils.unpack_tuple(builder, out_arr.shape, 1)[0]
        has_zeros_v, n_groups_v, steps_v, row0_v = args[5], args[7], args[8], args[10]
        i64 = steps_v.type
        mod = builder.module
        vnni = cgutils.get_or_insert_function(mod, ir.FunctionType(_V16, [_V16, _V16, _V16]),
                                              "llvm.x86.avx512.vpdpbusd.512")
        shuf = cgutils.get_or_insert_function(mod, ir.FunctionType(_V64, [_V64, _V64]),
                                              "llvm.x86.avx512.pshuf.b.512")
        multishift = cgutils.get_or_insert_function(mod, ir.FunctionType(_V64, [_V64, _V64]),
                                                    "llvm.x86.avx512.pmultishift.qb.512")
        prefetch = cgutils.get_or_insert_function(
            mod, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0i8")

        def const(v):
            return ir.Constant(i64, v)

        def at(ptr, offset, vtype):
            return builder.bitcast(builder.gep(ptr, [offset]), vtype.as_pointer())

        def bytes16(ptr, offset):
            return builder.zext(builder.load(at(ptr, offset, _B16), align=1), _V16)

        def fetch(ptr, offset):  # a read hint, kept in all cache levels; out of range is harmless
            builder.call(prefetch, [at(ptr, offset, _I8), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                    ir.Constant(_I32, 1)])

        def alloca(value):
            slot = cgutils.alloca_once(builder, value.type)
            builder.store(value, slot)
            return slot

        facc = [alloca(ir.Constant(_F16, [0.0] * 16)) for _ in range(2)]
        dots = [alloca(_splat(0)) for _ in range(2)]
        sums = [alloca(_splat(0)) for _ in range(2)]
        zvec = [alloca(_splat(8)) for _ in range(2)]
        code_group = builder.mul(steps_v, const(2 * TILE))  # bytes of one group's codes
        index_group = builder.mul(steps_v, const(TILE))
        with cgutils.for_range(builder, n_groups_v) as groups:
            g = groups.index
            g_codes = builder.gep(c_ptr, [builder.mul(g, code_group)])
            g_index = builder.gep(i_ptr, [builder.mul(g, index_group)])
            g_table = builder.gep(t_ptr, [builder.mul(g, builder.mul(steps_v, const(4)))])
            for h in range(2):
                builder.store(_splat(0), dots[h])
                builder.store(_splat(0), sums[h])
            with cgutils.for_range(builder, steps_v) as loop:
                j = loop.index
                row_j = builder.mul(j, const(TILE))
                # the next groups stream in while this one is computed (the tile layout's short
                # runs per group left the hardware prefetchers behind: 13.5 vs 14.7 GB/s dense)
                ahead = builder.add(row_j, builder.mul(code_group, const(AHEAD)))
                fetch(g_codes, ahead)
                fetch(g_codes, builder.add(ahead, index_group))
                fetch(g_index, builder.add(row_j, builder.mul(index_group, const(AHEAD))))
                t4 = builder.load(at(g_table, builder.mul(j, const(4)), _V4), align=4)
                tbl = builder.bitcast(builder.shuffle_vector(t4, ir.Constant(_V4, None),
                                                            ir.Constant(ir.VectorType(_I32, 16), [0, 1, 2, 3] * 4)), _V64)
                for h in range(2):
                    row = builder.add(row_j, const(LANES * h))
                    ca, cb = bytes16(g_codes, row), bytes16(g_codes, builder.add(row, index_group))
                    # control: byte s of a lane = 4s + the position of slot s (bits 2s of its index
                    # byte): the 16 index bytes widened two per qword, then vpmultishiftqb moves
                    # each 2-bit field to its own byte
                    ib = builder.load(at(g_index, row, _W8), align=1)
                    fields = builder.call(multishift, [_SPREAD_INDEX, builder.bitcast(builder.zext(ib, _Q8), _V64)])
                    ctrl = builder.or_(builder.and_(builder.bitcast(fields, _V16), _splat(0x03030303)),
                                       _splat(0x0C080400))
                    a = builder.bitcast(builder.call(shuf, [tbl, builder.bitcast(ctrl, _V64)]), _V16)
                    # codes: bytes (ca & 15, cb & 15, ca >> 4, cb >> 4) = slots 0, 1, 2, 3, picked
                    # out of (ca | cb << 8) by vpmultishiftqb
                    pair = builder.bitcast(builder.or_(ca, builder.shl(cb, _splat(8))), _V64)
                    w = builder.and_(builder.bitcast(builder.call(multishift, [_SPREAD_CODES, pair]), _V16),
                                     _splat(0x0F0F0F0F))
                    builder.store(builder.call(vnni, [builder.load(dots[h]), w, a]), dots[h])
                    builder.store(builder.call(vnni, [builder.load(sums[h]), _splat(0x01010101), a]), sums[h])
            # the group's scale per lane (float16 -> float32) and its zero-points
            dg = builder.load(builder.gep(d_ptr, [g]))
            dgs = builder.shuffle_vector(builder.insert_element(ir.Constant(_F16, None), dg, ir.Constant(_I32, 0)),
                                         ir.Constant(_F16, None), ir.Constant(ir.VectorType(_I32, 16), [0] * 16))
            for h in range(2):
                lane0 = builder.add(builder.mul(g, const(TILE)), const(LANES * h))
                with builder.if_then(has_zeros_v):
                    builder.store(bytes16(z_ptr, lane0), zvec[h])
                halves = builder.load(at(s_ptr, lane0, ir.VectorType(ir.IntType(16), 16)), align=2)
                sc = builder.fpext(builder.bitcast(halves, ir.VectorType(ir.HalfType(), 16)), _F16)
                dot = builder.sub(builder.load(dots[h]), builder.mul(builder.load(zvec[h]), builder.load(sums[h])))
                term = builder.fmul(builder.fmul(builder.sitofp(dot, _F16), sc), dgs)
                builder.store(builder.fadd(builder.load(facc[h]), term), facc[h])
        # store the tile's rows that exist (the last tile may be partial)
        for h in range(2):
            v = builder.load(facc[h])
            base = builder.add(row0_v, const(LANES * h))
            with cgutils.for_range(builder, const(LANES)) as lane:
                r = builder.add(base, lane.index)
                with builder.if_then(builder.icmp_signed("<", r, n_rows)):
                    builder.store(builder.extract_element(v, lane.index), builder.gep(out_ptr, [r]))
        return context.get_dummy_value()
    return sig, codegen


@njit(cache=True)
def step_table(xq, k, group, n):
    """The shuffle tables of an n:4 weight from the int8 activations xq (n_groups, P) (quantized
    per group, quant.quantize_x): (n_groups, L, 4) int32, [g, j, s] = the 4 activations of the
    block of the kept value in slot s, step j (value e = s·L_g + j; L_g = the group's padded
    count / 4, as sparse.slot_grid), 0 in the padding. The n kept values of a block share it."""
    n_groups = xq.shape[0]
    full_l = (group * n // 4 + 7) // 8 * 8 // 4
    out = np.zeros((n_groups, full_l, 4), np.int32)
    for g in range(n_groups):
        count = (min(k, (g + 1) * group) - g * group) * n // 4
        lg = (count + 7) // 8 * 8 // 4
        for e in range(count):
            base = (e // n) * 4
            word = (np.uint32(np.uint8(xq[g, base])) | np.uint32(np.uint8(xq[g, base + 1])) << np.uint32(8)
                    | np.uint32(np.uint8(xq[g, base + 2])) << np.uint32(16)
                    | np.uint32(np.uint8(xq[g, base + 3])) << np.uint32(24))
            out[g, e % lg, e // lg] = np.int32(word)
    return out


@njit(cache=True, fastmath=FAST)
def tiles_n4(codes, scales, zeros, has_zeros, h2f, index, table, d, b0, b1, out, iscratch, fscratch):
    """sparse._tiles_n4 for rows of tiles b0..b1-1 (table: step_table; h2f and the scratch are
    the portable kernel's arguments, unused: the whole tile runs in registers)."""
    n_groups = codes.shape[1]
    ll = index.shape[2]
    for b in range(b0, b1):
        _nm4_tile(codes[b], index[b], table, scales[b], zeros[b] if has_zeros else zeros[0], has_zeros, d,
                  n_groups, ll, out, b * TILE)
