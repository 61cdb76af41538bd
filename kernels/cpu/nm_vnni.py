"""2:4 (n:4) sparse q4 tiles through AVX-512 byte shuffles and VNNI dot products.

The portable tile kernel (sparse._tiles_n4) picks each kept value's int8 activation with a
variable shift and multiplies in int32 lanes: about 40 vector operations per 16 rows and 4 kept
values. Here, per step j of a tile's group and 16 rows (one 32-bit lane per row):

  table   the 4 slots' candidate activations of step j, 16 bytes (byte 4s + c = column c of the
          block in slot s), broadcast to every 128-bit lane;
  control byte s of a lane = 4s + p_s, the lane's 2-bit positions spread to bytes;
  a       vpshufb(table, control): the lane's 4 kept values' activations, signed bytes;
  w       the lane's 4 codes as unsigned bytes (slot order: low nibbles of the two code bytes,
          then their high nibbles);
  dot     += vpdpbusd(w, a);  asum += vpdpbusd(1, a)   (Σ q·a and Σ a over kept values)

so the group's integer dot product is dot − z·asum, exactly the portable kernel's, in about 20
operations. The tile layout is sparse.py's (TILE = 32 rows: two halves of 16 lanes).
Compiled only on CPUs with AVX512-VNNI and AVX512-BW (has_nm_vnni): the intrinsics are a fatal
LLVM error elsewhere.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .int8 import VNNI
from .quant import FAST


def has_nm_vnni() -> bool:
    """Whether this CPU runs the kernel: AVX512-VNNI (vpdpbusd) and AVX512-BW (vpshufb on zmm)."""
    if not VNNI:
        return False
    from llvmlite.binding import get_host_cpu_features

    return bool(get_host_cpu_features().get("avx512bw", False))


LANES = 16  # rows per 512-bit vector of int32 lanes
TILE = 32  # sparse.TILE: two vectors

_I8, _I32 = ir.IntType(8), ir.IntType(32)
_V16 = ir.VectorType(_I32, 16)
_V64 = ir.VectorType(_I8, 64)
_B16 = ir.VectorType(_I8, 16)
_V4 = ir.VectorType(_I32, 4)


def _splat(value: int) -> ir.Constant:
    return ir.Constant(_V16, [value] * 16)


@intrinsic
def _nm4_dots(typingctx, codes, index, table, steps, dot, asum):
    """dot[t], asum[t] (t < 32) = Σ_j Σ_s code·a and Σ_j Σ_s a of row t of one tile's group:
    codes (2L, 32) u8 (rows 0..L-1: slots 0 | 2 << 4, rows L..2L-1: slots 1 | 3 << 4), index
    (L, 32) u8 (slot s at bits 2s), table (L, 4) int32 (slot s's candidates), steps = L."""
    sig = types.none(codes, index, table, steps, dot, asum)

    def codegen(context, builder, signature, args):
        c_ptr, i_ptr, t_ptr, _, d_ptr, s_ptr = (
            context.make_array(signature.args[i])(context, builder, args[i]).data if i != 3 else None
            for i in range(6))
        steps_v = args[3]
        mod = builder.module
        vnni = cgutils.get_or_insert_function(mod, ir.FunctionType(_V16, [_V16, _V16, _V16]),
                                              "llvm.x86.avx512.vpdpbusd.512")
        shuf = cgutils.get_or_insert_function(mod, ir.FunctionType(_V64, [_V64, _V64]),
                                              "llvm.x86.avx512.pshuf.b.512")
        accs = []
        for _ in range(4):  # dot and asum for each half
            acc = cgutils.alloca_once(builder, _V16)
            builder.store(_splat(0), acc)
            accs.append(acc)
        i64 = steps_v.type

        def bytes16(ptr, offset):
            p = builder.bitcast(builder.gep(ptr, [offset]), _B16.as_pointer())
            return builder.zext(builder.load(p, align=1), _V16)

        with cgutils.for_range(builder, steps_v) as loop:
            j = loop.index
            t4 = builder.load(builder.bitcast(builder.gep(t_ptr, [builder.mul(j, ir.Constant(i64, 4))]),
                                              _V4.as_pointer()), align=4)
            tbl = builder.bitcast(builder.shuffle_vector(t4, ir.Constant(_V4, None),
                                                        ir.Constant(ir.VectorType(_I32, 16), [0, 1, 2, 3] * 4)), _V64)
            for h in range(2):
                row = builder.add(builder.mul(j, ir.Constant(i64, TILE)), ir.Constant(i64, LANES * h))
                row_b = builder.add(builder.mul(builder.add(j, steps_v), ir.Constant(i64, TILE)),
                                    ir.Constant(i64, LANES * h))
                ca, cb, ib = bytes16(c_ptr, row), bytes16(c_ptr, row_b), bytes16(i_ptr, row)
                # control: byte s = 4s + position of slot s (bits 2s of the index byte)
                ctrl = builder.and_(ib, _splat(3))
                for s in (1, 2, 3):
                    field = builder.and_(builder.shl(ib, _splat(6 * s)), _splat(3 << (8 * s)))
                    ctrl = builder.or_(ctrl, field)
                ctrl = builder.or_(ctrl, _splat(0x0C080400))
                a = builder.bitcast(builder.call(shuf, [tbl, builder.bitcast(ctrl, _V64)]), _V16)
                # codes: bytes (ca & 15, cb & 15, ca >> 4, cb >> 4) = slots 0, 1, 2, 3
                pair = builder.or_(ca, builder.shl(cb, _splat(8)))
                lo = builder.and_(pair, _splat(0x0F0F))
                hi = builder.and_(builder.lshr(pair, _splat(4)), _splat(0x0F0F))
                w = builder.or_(lo, builder.shl(hi, _splat(16)))
                dot_acc, sum_acc = accs[2 * h], accs[2 * h + 1]
                builder.store(builder.call(vnni, [builder.load(dot_acc), w, a]), dot_acc)
                builder.store(builder.call(vnni, [builder.load(sum_acc), _splat(0x01010101), a]), sum_acc)
        for h in range(2):
            for acc, out in ((accs[2 * h], d_ptr), (accs[2 * h + 1], s_ptr)):
                p = builder.bitcast(builder.gep(out, [ir.Constant(i64, LANES * h)]), _V16.as_pointer())
                builder.store(builder.load(acc), p, align=4)
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
def tiles_n4(codes, scales, zeros, has_zeros, h2f, index, table, d, b0, b1, out):
    """sparse._tiles_n4 for rows of tiles b0..b1-1 on this module's dot products (table:
    step_table)."""
    n_groups = codes.shape[1]
    ll = index.shape[2]
    rows = out.shape[0]
    dot = np.zeros(TILE, np.int32)
    asum = np.zeros(TILE, np.int32)
    acc = np.zeros(TILE, np.float32)
    for b in range(b0, b1):
        acc[:] = 0.0
        for g in range(n_groups):
            _nm4_dots(codes[b, g], index[b, g], table[g], ll, dot, asum)
            dg = d[g]
            if has_zeros:
                for t in range(TILE):
                    acc[t] += h2f[scales[b, g, t]] * dg * np.float32(dot[t] - np.int32(zeros[b, g, t]) * asum[t])
            else:
                for t in range(TILE):
                    acc[t] += h2f[scales[b, g, t]] * dg * np.float32(dot[t] - np.int32(8) * asum[t])
        for t in range(TILE):
            r = b * TILE + t
            if r < rows:
                out[r] = acc[t]
