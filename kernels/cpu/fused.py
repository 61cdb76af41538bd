"""A whole decode step (every block of qformat.block, then the head) in one compiled call.

Calling the per-operation kernels from Python costs a few microseconds each; a 30-layer model
makes ~20 of them per layer, which measured 4.5 ms per token of pure overhead on SmolLM2's shape,
half of llama.cpp's whole time per token. Here the step runs in Numba end to end: the blocks'
steps (qformat.block) are encoded once at load as small integer programs, one row per step, and
`decode_step` interprets them, calling the same kernels the per-operation path calls (so both
paths compute the same numbers). A new kind of step adds a code to qformat.block.STEP_TYPES and a
branch here; a new architecture or per-layer flag changes only the programs.

The weights reach the compiled step as a table of addresses into the memory map (a typed list
of arrays costs ~1 s of compilation at every start, a tuple of 211 arrays ~100 us per call;
an int64 table costs nothing), one row per linear layer, filled by the op that runs it
(base.py's columns; `fused_row`). The FusedDecoder keeps every array alive while it exists.
Norm weights, biases and q/k norms are small and are gathered into stacked float32 arrays.

Sidecars run here too: a permutation gathers x once per linear layer (spec §6.1), sparse outliers
(§6.2), 16-bit columns (§6.4) and a LoRA adapter's B (A x) (lora.py) are added after the GEMV
from the unpermuted x, and n:m sparse weights (§6.3) dispatch to sparse.py. Per-channel q8
weights with 8-bit activations (W8A8, §6.5) run the integer GEMV of int8.py; an op that fills
no row (another W8A8 layout, input_scale) makes `build` return None and the model uses the
per-operation path.

Only what a model uses is compiled: `gemv_row` takes one argument per GEMV routine
(base.ROUTINES), None for the routines no row of the model names, and numba drops the branches
of None arguments before compiling, so a q4 model never compiles the sparse or W8A8 kernels.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from qformat.block import (GATE, LOGITS, STEP_TYPES, UP, X, Attention, Block, Glu, HeadNorm, Linear, Moe, Norm,
                           SigmoidGate, Softcap, expert_name)
from qformat.config import ACTIVATIONS

from . import dense, int8, ops, quant, sparse
from .base import (ACT, ACT_SCALE, CODE_BITS, CODE_BYTES, CODES, FP_COLS, FP_W, GROUP, H2F, HAS_ZEROS, IN, IS_NF4, N_FP,
                   LORA_A, LORA_B, LORA_RANK, N_GROUPS, N_TILES, NM_INDEX, NM_INDEX_BYTES, NM_M, NM_N, NM_TILE,
                   OFFSETS, OUT_COLS, OUT_PTR, OUT_VALS, PERM, ROUTINE, ROUTINE_COL, ROUTINES, ROWS, SCALES, ZEROS,
                   add_offsets, add_offsets_q8)
from .lora import lora_add

# Step codes: a step's index in qformat.block.STEP_TYPES.
NORM, HEAD_NORM, LINEAR, ATTENTION, GLU, SOFTCAP, MOE, SIGMOID_GATE = (
    STEP_TYPES.index(t) for t in (Norm, HeadNorm, Linear, Attention, Glu, Softcap, Moe, SigmoidGate))
# Columns of a program row: the step code, then up to six integer operands (per step kind:
#   NORM       norm row, src, dst, residual (0/1)   HEAD_NORM  head-norm row, buffer, width
#   LINEAR     table row, src, dst, bias row (-1: none), residual (0/1)
#   ATTENTION  q, k, v, dst, window (0: none), RoPE table; its scale and soft cap (0: none) are
#              the step's float operands
#   GLU        gate, up, activation (config.ACTIVATIONS' index)
#   SOFTCAP    buffer; the cap is its float operand
#   MOE        router row, src, dst, residual, first expert row (the experts' gate rows, then
#              their up rows, then their down rows, consecutive), n_experts, top_k, norm_topk,
#              activation, logits buffer, gate buffer, up buffer)
#   SIGMOID_GATE src, gate, dst
# and buffers are numbered in their order of first use, the residual stream first.
OP, A, B, C, D, E, F, G, H, I, J, K, L = range(13)
PROGRAM_WIDTH = 13
SILU, GELU_TANH = (ACTIVATIONS.index(a) for a in ("silu", "gelu_tanh"))
assert len(ACTIVATIONS) == 2, "an activation was added to config.ACTIVATIONS: give it a branch in decode_step"

# GEMV routine codes (base.ROUTINES), one branch each in gemv_row.
(R_F32, R_F16, R_BF16, R_Q8, R_Q6, R_Q5, R_Q4, R_Q3, R_Q2, R_NF4, R_Q8ACT, R_NM, R_NM_Q4_Q8ACT, R_W8A8) = (
    ROUTINE[name] for name in ("f32", "f16", "bf16", "q8", "q6", "q5", "q4", "q3", "q2", "nf4", "q8act", "n:m",
                               "n:m-q4-q8act", "w8a8"))
assert len(ROUTINES) == 14, "a routine was added to base.ROUTINES: give it a branch in gemv_row"


@intrinsic
def _address(typingctx, addr):
    """An integer address as a void pointer, for numba.carray."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.intp), codegen


@njit(cache=True)
def _view2(a, rows, cols):
    """float32 a (rows·cols, C-contiguous) as (rows, cols), through its address: a reshape's
    error path (a message with the shapes) alone costs seconds of compilation per call site."""
    return carray(_address(a.ctypes.data), (rows, cols), np.float32)


@njit(cache=True)
def _view3(a, n, rows, cols):
    """_view2 in three dimensions."""
    return carray(_address(a.ctypes.data), (n, rows, cols), np.float32)


@njit(cache=True)
def _store(cache, layer, slot, x):
    """cache[layer, slot] = x (n_kv, head_dim), element by element: an array assignment's
    shape-mismatch error costs as much compilation as the reshape's."""
    for h in range(x.shape[0]):
        for j in range(x.shape[1]):
            cache[layer, slot, h, j] = x[h, j]


@njit(cache=True)
def _zeros(table, i, rows, n_groups):
    """The zeros (rows, n_groups) of row i, or (symmetric: never read) a valid stand-in."""
    has = table[i, HAS_ZEROS] != 0
    return carray(_address(table[i, ZEROS] if has else table[i, CODES]), (rows, n_groups) if has else (1, 1),
                  np.uint8)


@njit(cache=True)
def _tiled_zeros(table, i, tiles, n_groups, lanes):
    """_zeros in the q4 tile layout (tiles, n_groups, lanes)."""
    has = table[i, HAS_ZEROS] != 0
    return carray(_address(table[i, ZEROS] if has else table[i, CODES]),
                  (tiles, n_groups, lanes) if has else (1, 1, 1), np.uint8)


@njit(cache=True)
def _gemv_sparse_q4(table, i, h2f, x, out):
    """out = W_i @ x for an n:m sparse q4 weight in the tile layout, int8 activations."""
    tiles, lanes, n_groups = table[i, N_TILES], table[i, NM_TILE], table[i, N_GROUPS]
    codes = carray(_address(table[i, CODES]), (tiles, n_groups, table[i, CODE_BYTES], lanes), np.uint8)
    scales = carray(_address(table[i, SCALES]), (tiles, n_groups, lanes), np.uint16)
    zeros = _tiled_zeros(table, i, tiles, n_groups, lanes)
    index = carray(_address(table[i, NM_INDEX]), (tiles, n_groups, table[i, NM_INDEX_BYTES], lanes), np.uint8)
    sparse.gemv_nm_q4_q8act(codes, scales, zeros, table[i, HAS_ZEROS] != 0, h2f, index, x, table[i, IN],
                            table[i, GROUP], table[i, NM_N], table[i, NM_M], out)


@njit(cache=True)
def _gemv_sparse(table, i, h2f, x, out):
    """out = W_i @ x for an n:m sparse weight of any kind, float activations."""
    rows, n_groups = table[i, ROWS], table[i, N_GROUPS]
    codes = carray(_address(table[i, CODES]), (rows, table[i, CODE_BYTES]), np.uint8)
    scales = carray(_address(table[i, SCALES]), (rows, n_groups), np.uint16)
    zeros = _zeros(table, i, rows, n_groups)
    index = carray(_address(table[i, NM_INDEX]), (rows, table[i, NM_INDEX_BYTES]), np.uint8)
    sparse.gemv_nm(table[i, CODE_BITS], table[i, IS_NF4] != 0, codes, scales, zeros, table[i, HAS_ZEROS] != 0,
                   h2f, index, x, table[i, IN], table[i, GROUP], table[i, NM_N], table[i, NM_M], out)


@njit(cache=True)
def _add_sidecars(table, i, x, out):
    """out += sparse outliers · x and 16-bit columns · x (x in the original channel order)."""
    rows = table[i, ROWS]
    if table[i, OUT_PTR] != 0:
        ptr = carray(_address(table[i, OUT_PTR]), (rows + 1,), np.int32)
        nnz = max(1, ptr[rows])
        cols = carray(_address(table[i, OUT_COLS]), (nnz,), np.int32)
        vals = carray(_address(table[i, OUT_VALS]), (nnz,), np.float32)
        for r in range(rows):
            acc = np.float32(0.0)
            for e in range(ptr[r], ptr[r + 1]):
                acc += vals[e] * x[cols[e]]
            out[r] += acc
    n_fp = table[i, N_FP]
    if n_fp:
        cols = carray(_address(table[i, FP_COLS]), (n_fp,), np.int32)
        w = carray(_address(table[i, FP_W]), (rows, n_fp), np.float32)
        for r in range(rows):
            acc = np.float32(0.0)
            for c in range(n_fp):
                acc += w[r, c] * x[cols[c]]
            out[r] += acc


@njit(cache=True)
def _offsets(table, i):
    """Row i's offsets (rows, n_groups) as float16 bits (spec §4.2)."""
    return carray(_address(table[i, OFFSETS]), (table[i, ROWS], table[i, N_GROUPS]), np.uint16)


@njit(cache=True)
def _add_offsets(table, i, h2f, xs, out):
    """out += offsets · the group sums of xs (the dense part's input, stored column order; spec §4.2)."""
    add_offsets(_offsets(table, i), h2f, xs, table[i, IN], table[i, GROUP], out)


@njit(cache=True)
def _dense_input(table, i, x):
    """The dense part's input: x with the 16-bit columns zeroed (base.Sidecars.stored_x), in
    stored column order (gathered once through the permutation, spec §6.1)."""
    xz = x
    n_fp = table[i, N_FP]
    if n_fp:
        xz = x.copy()
        cols = carray(_address(table[i, FP_COLS]), (n_fp,), np.int32)
        for c in range(n_fp):
            xz[cols[c]] = 0.0
    if table[i, PERM] == 0:
        return xz
    k = table[i, IN]
    perm = carray(_address(table[i, PERM]), (k,), np.int32)
    xs = np.empty(k, np.float32)
    for j in range(k):
        xs[j] = xz[perm[j]]
    return xs


@njit(cache=True)
def _gemv_w8a8(table, i, h2f, xs, out):
    """out = W_i @ xs on int8 activations (W8A8): per-token (or static) int8 codes of the dense
    input and the integer GEMV, as int8.W8A8Op.gemv."""
    codes, scales, zeros, has_zeros, k, _ = _grouped(table, i)
    static = table[i, ACT] == 2
    scale = carray(_address(table[i, ACT_SCALE]), (1,), np.float32)[0] if static else np.float32(0.0)
    xq = np.empty((1, k), np.int8)
    d = np.empty(1, np.float32)
    sums = np.empty(1, np.int32)
    int8.quantize_tokens(_view2(xs, 1, k), scale, static, xq, d, sums)
    int8.GEMV(codes, scales, zeros, has_zeros, h2f, xq[0], d[0], sums[0], k, out)


@njit(cache=True)
def _grouped(table, i):
    """Row i's dense grouped operands: codes, scales, zeros, has_zeros, in_features, group."""
    rows, n_groups = table[i, ROWS], table[i, N_GROUPS]
    codes = carray(_address(table[i, CODES]), (rows, table[i, CODE_BYTES]), np.uint8)
    scales = carray(_address(table[i, SCALES]), (rows, n_groups), np.uint16)
    return codes, scales, _zeros(table, i, rows, n_groups), table[i, HAS_ZEROS] != 0, table[i, IN], table[i, GROUP]


@njit(cache=True)
def _gemv_float_act(table, i, h2f, x, out, gemv):
    """out = W_i @ x for dense grouped rows through `gemv` (quant.GEMV[kind]), float activations
    (x in stored column order)."""
    codes, scales, zeros, has_zeros, k, group = _grouped(table, i)
    xp, xsum = quant.pad_x(x, k, group, (group + 7) // 8 * 8)
    gemv(codes, scales, zeros, has_zeros, h2f, xp, xsum, k, group, out)


@njit(cache=True)
def _gemv_q8act(table, i, h2f, x, out):
    """out = W_i @ x for dense q2-q6 rows on int8 activations, as grouped.GroupQuantOp.gemv."""
    codes, scales, zeros, has_zeros, k, group = _grouped(table, i)
    xq, d, sums = quant.quantize_x(x, k, group, (group + 7) // 8 * 8)
    quant.gemv_q8act(codes, scales, zeros, has_zeros, h2f, xq, d, sums, k, group, table[i, CODE_BITS], out)
    if table[i, OFFSETS] != 0:  # on the rounded activations' sums, as base.Sidecars.add_gemv
        add_offsets_q8(_offsets(table, i), h2f, d, sums, out)


@njit(cache=True)
def gemv_row(table, i, h2f, x, out, f32, f16, bf16, q8, q6, q5, q4, q3, q2, nf4, q8act, nm, nm_q4_q8act, w8a8):
    """out = W_i @ x for the weight in row i of the table, sidecars and a LoRA adapter included.
    The arguments after `out` are 0 for each routine some row may name and None for the others
    (see the module docstring), in the order of base.ROUTINES."""
    _gemv_weight(table, i, h2f, x, out, f32, f16, bf16, q8, q6, q5, q4, q3, q2, nf4, q8act, nm, nm_q4_q8act, w8a8)
    r = table[i, LORA_RANK]
    if r != 0:
        lora_add(carray(_address(table[i, LORA_A]), (r, table[i, IN]), np.float32),
                 carray(_address(table[i, LORA_B]), (r, table[i, ROWS]), np.float32), x, out)


@njit(cache=True)
def _gemv_weight(table, i, h2f, x, out, f32, f16, bf16, q8, q6, q5, q4, q3, q2, nf4, q8act, nm, nm_q4_q8act, w8a8):
    """gemv_row's product of the weight itself, sidecars included."""
    r = table[i, ROUTINE_COL]
    w = table[i, CODES]
    rows, k = table[i, ROWS], table[i, IN]
    if f32 is not None:
        if r == R_F32:
            dense.gemv_f32(carray(_address(w), (rows, k), np.float32), x, out)
    if f16 is not None:
        if r == R_F16:
            dense.gemv_f16(carray(_address(w), (rows, k), np.uint16), x, out)
    if bf16 is not None:
        if r == R_BF16:
            dense.gemv_bf16(carray(_address(w), (rows, k), np.uint16), x, out)
    if r == R_F32 or r == R_F16 or r == R_BF16:  # float weights carry no sidecars
        return
    xs = _dense_input(table, i, x)
    if q8 is not None:
        if r == R_Q8:
            _gemv_float_act(table, i, h2f, xs, out, quant.gemv_q8)
    if q6 is not None:
        if r == R_Q6:
            _gemv_float_act(table, i, h2f, xs, out, quant.gemv_q6)
    if q5 is not None:
        if r == R_Q5:
            _gemv_float_act(table, i, h2f, xs, out, quant.gemv_q5)
    if q4 is not None:
        if r == R_Q4:
            _gemv_float_act(table, i, h2f, xs, out, quant.gemv_q4)
    if q3 is not None:
        if r == R_Q3:
            _gemv_float_act(table, i, h2f, xs, out, quant.gemv_q3)
    if q2 is not None:
        if r == R_Q2:
            _gemv_float_act(table, i, h2f, xs, out, quant.gemv_q2)
    if nf4 is not None:
        if r == R_NF4:
            _gemv_float_act(table, i, h2f, xs, out, quant.gemv_nf4)
    if q8act is not None:
        if r == R_Q8ACT:
            _gemv_q8act(table, i, h2f, xs, out)
    if nm is not None:
        if r == R_NM:
            _gemv_sparse(table, i, h2f, xs, out)
    if nm_q4_q8act is not None:
        if r == R_NM_Q4_Q8ACT:
            _gemv_sparse_q4(table, i, h2f, xs, out)
    if w8a8 is not None:
        if r == R_W8A8:
            _gemv_w8a8(table, i, h2f, xs, out)
    if table[i, OFFSETS] != 0 and r != R_Q8ACT:
        _add_offsets(table, i, h2f, xs, out)
    if table[i, OUT_PTR] != 0 or table[i, N_FP] != 0:
        _add_sidecars(table, i, x, out)


@njit(cache=True, nogil=True)
def _moe(op, bufs, table, h2f, routines):
    """A mixture-of-experts step for one token (qformat.block.Moe; routing as
    kernels/reference.route: softmax, the top_k by descending probability, lowest index first
    among ties, then summed in ascending expert order)."""
    src, dst, logits, gate, up = bufs[op[B]], bufs[op[C]], bufs[op[J]], bufs[op[K]], bufs[op[L]]
    n, k, first = op[F], op[G], op[E]
    gemv_row(table, op[A], h2f, src, logits, *routines)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    chosen = np.argsort(-p, kind="mergesort")[:k]  # stable: the lower index first among ties
    w = np.empty(k, np.float32)
    for j in range(k):
        w[j] = p[chosen[j]]
    if op[H]:
        w /= w.sum()
    order = np.argsort(chosen)
    total = np.zeros(dst.size, np.float32)
    tmp = np.empty(dst.size, np.float32)
    for j in order:
        e = chosen[j]
        gemv_row(table, first + e, h2f, src, gate, *routines)
        gemv_row(table, first + n + e, h2f, src, up, *routines)
        if op[I] == SILU:
            ops.silu_mul(_view2(gate, 1, gate.size), _view2(up, 1, up.size))
        elif op[I] == GELU_TANH:
            ops.gelu_tanh_mul(_view2(gate, 1, gate.size), _view2(up, 1, up.size))
        gemv_row(table, first + 2 * n + e, h2f, gate, tmp, *routines)
        total += w[j] * tmp
    if op[D]:
        dst += total
    else:
        dst[:] = total


@njit(cache=True, nogil=True)  # a server's HTTP thread runs while a step computes
def decode_step(x, pos, programs, n_steps, floats, widths, table, norms, head_norms, biases, k_cache, v_cache,
                slots, cos, sin, n_heads, n_kv, head_dim, eps, h2f, logits, logits_buffer, routines):
    """Run one token through every block's program (see the module docstring).

    x (dim,) embedding of the token (updated in place as the residual stream); pos its position;
    programs (n_blocks, max_steps, PROGRAM_WIDTH) int64 and n_steps (n_blocks,): the blocks'
    steps, block b < n_layers being layer b (its KV cache), the last the output block; floats
    (n_blocks, max_steps, 2) float32: the steps' float operands; widths (n_buffers,): each
    buffer's width; table (n_linears, base.WIDTH) int64: the weights; norms (n, dim), head_norms
    (n, width), biases (n, max width, zero-padded): the rows the programs name; k_cache,
    v_cache (n_layers, n_slots, n_kv_heads, head_dim): the paged pool, slots (1, L) int32 the
    sequence's slot of each position (runtime/kvcache.py); cos, sin (n_tables, max_seq,
    head_dim/2); logits (vocab,): written, it is buffer `logits_buffer`; routines: gemv_row's
    routine arguments.
    """
    bufs = [x if b == 0 else logits if b == logits_buffer else np.empty(widths[b], np.float32)
            for b in range(widths.size)]
    slot = slots[0, pos]
    stops = np.full(1, pos + 1, np.int64)
    for blk in range(programs.shape[0]):
        for s in range(n_steps[blk]):
            op = programs[blk, s]
            code = op[OP]
            if code == NORM:
                src, dst = bufs[op[B]], bufs[op[C]]
                if op[D]:  # residual: dst += RMSNorm(src)
                    tmp = np.empty(dst.size, np.float32)
                    ops.rmsnorm(_view2(src, 1, src.size), norms[op[A]], eps, _view2(tmp, 1, tmp.size))
                    dst += tmp
                else:
                    ops.rmsnorm(_view2(src, 1, src.size), norms[op[A]], eps, _view2(dst, 1, dst.size))
            elif code == LINEAR:
                src, dst = bufs[op[B]], bufs[op[C]]
                if op[E]:  # residual: dst += W src
                    tmp = np.empty(dst.size, np.float32)
                    gemv_row(table, op[A], h2f, src, tmp, *routines)
                    dst += tmp
                else:
                    gemv_row(table, op[A], h2f, src, dst, *routines)
                if op[D] >= 0:
                    dst += biases[op[D], :dst.size]
            elif code == HEAD_NORM:
                buf = bufs[op[B]]
                heads = _view2(buf, buf.size // op[C], op[C])
                ops.rmsnorm(heads.copy(), head_norms[op[A], :op[C]], eps, heads)
            elif code == ATTENTION:
                q3 = _view3(bufs[op[A]], 1, n_heads, head_dim)
                k3 = _view3(bufs[op[B]], 1, n_kv, head_dim)
                c1 = cos[op[F], pos:pos + 1]
                s1 = sin[op[F], pos:pos + 1]
                ops.rope(q3, c1, s1)
                ops.rope(k3, c1, s1)
                _store(k_cache, blk, slot, k3[0])
                _store(v_cache, blk, slot, _view2(bufs[op[C]], n_kv, head_dim))
                window = op[E]
                starts = np.full(1, 0 if window == 0 else max(0, pos + 1 - window), np.int64)
                ops.attention_decode(q3, k_cache[blk], v_cache[blk], slots, starts, stops, floats[blk, s, 0],
                                     floats[blk, s, 1], _view3(bufs[op[D]], 1, n_heads, head_dim))
            elif code == GLU:
                gate, up = bufs[op[A]], bufs[op[B]]
                if op[C] == SILU:
                    ops.silu_mul(_view2(gate, 1, gate.size), _view2(up, 1, up.size))
                elif op[C] == GELU_TANH:
                    ops.gelu_tanh_mul(_view2(gate, 1, gate.size), _view2(up, 1, up.size))
            elif code == SOFTCAP:
                buf = bufs[op[A]]
                ops.softcap(_view2(buf, 1, buf.size), floats[blk, s, 0])
            elif code == MOE:
                _moe(op, bufs, table, h2f, routines)
            elif code == SIGMOID_GATE:
                src, dst = bufs[op[A]], bufs[op[C]]
                ops.sigmoid_gate_add(_view2(dst, 1, dst.size), _view2(src, 1, src.size), _view2(bufs[op[B]], 1, 1))


class Programs:
    """The blocks' steps as decode_step's arrays; linear steps point at weight-table rows."""

    def __init__(self, blocks: list[Block], reader, linear_rows: dict[str, int]):
        names: dict[str, int] = {}
        widths: list[int] = []

        def buffer(name: str, width: int) -> int:
            if name not in names:
                names[name] = len(widths)
                widths.append(width)
            return names[name]

        self.norms, self.head_norms, self.biases = [], [], []

        def stacked(rows: list, tensor: str) -> int:
            rows.append(np.asarray(reader[tensor].arrays["data"], np.float32))
            return len(rows) - 1

        max_steps = max(len(b.steps) for b in blocks)
        self.programs = np.zeros((len(blocks), max_steps, PROGRAM_WIDTH), np.int64)
        self.n_steps = np.array([len(b.steps) for b in blocks], np.int64)
        self.floats = np.zeros((len(blocks), max_steps, 2), np.float32)
        for bi, blk in enumerate(blocks):
            buf = {n: buffer(n, w) for n, w in blk.widths.items()}
            for si, step in enumerate(blk.steps):
                row = self.programs[bi, si]
                row[OP] = STEP_TYPES.index(type(step))
                if isinstance(step, Norm):
                    row[A:D + 1] = stacked(self.norms, step.weight), buf[step.src], buf[step.dst], int(step.residual)
                elif isinstance(step, HeadNorm):
                    row[A:C + 1] = stacked(self.head_norms, step.weight), buf[step.buf], step.width
                elif isinstance(step, Linear):
                    bias = stacked(self.biases, step.bias) if step.bias is not None else -1
                    row[A:E + 1] = linear_rows[step.weight], buf[step.src], buf[step.dst], bias, int(step.residual)
                elif isinstance(step, Attention):
                    row[A:F + 1] = buf[step.q], buf[step.k], buf[step.v], buf[step.dst], step.window or 0, step.rope
                    self.floats[bi, si] = step.scale, step.softcap or 0.0
                elif isinstance(step, Glu):
                    row[A:C + 1] = buf[step.gate], buf[step.up], ACTIVATIONS.index(step.activation)
                elif isinstance(step, Softcap):
                    row[A] = buf[step.buf]
                    self.floats[bi, si, 0] = step.cap
                elif isinstance(step, Moe):
                    first = linear_rows[expert_name(step.gate, 0)]
                    assert [linear_rows[n] for n in step.ops()[1:]] == list(range(first, first + 3 * step.n_experts))
                    row[A:L + 1] = (linear_rows[step.router], buf[step.src], buf[step.dst], int(step.residual), first,
                                    step.n_experts, step.top_k, int(step.norm_topk),
                                    ACTIVATIONS.index(step.activation), buf[step.logits], buf[GATE], buf[UP])
                elif isinstance(step, SigmoidGate):
                    row[A:C + 1] = buf[step.src], buf[step.gate], buf[step.dst]
                else:
                    raise NotImplementedError(f"the fused CPU step has no code for {type(step).__name__}")
        self.buffers = names
        self.widths = np.array(widths, np.int64)
        self.norms = _stack(self.norms)
        self.head_norms = _stack(self.head_norms)
        self.biases = _stack(self.biases)


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of possibly different lengths as one zero-padded float32 array ((0, 0) for none)."""
    if not rows:
        return np.zeros((0, 0), np.float32)
    out = np.zeros((len(rows), max(r.size for r in rows)), np.float32)
    for i, r in enumerate(rows):
        out[i, :r.size] = r
    return out


class FusedDecoder:
    """The weight table and block programs of a model; call with (embedding, position)."""

    def __init__(self, blocks: list[Block], reader, args, cache, cos, sin, rows: dict[str, tuple]):
        names = list(rows)
        table, keep = zip(*rows.values())
        self.table = np.asarray(table, np.int64)  # (n_linears, base.WIDTH)
        self._keep = keep  # the arrays whose addresses are in the table
        self.programs = Programs(blocks, reader, {n: i for i, n in enumerate(names)})
        assert self.programs.buffers[X] == 0, "decode_step keeps the residual stream in buffer 0"
        used = set(self.table[:, ROUTINE_COL].tolist())
        self.routines = tuple(0 if r in used else None for r in range(len(ROUTINES)))
        self.args = args
        self.cache = cache
        self.cos, self.sin = cos, sin
        self.logits_buffer = self.programs.buffers[LOGITS]
        self.vocab = int(self.programs.widths[self.logits_buffer])
        self.eps = np.float32(args.norm_eps)

    def __call__(self, x: np.ndarray, pos: int, slots: np.ndarray) -> np.ndarray:
        """Logits after the token of embedding x at position pos of the sequence whose slot map
        is slots (L,) int32."""
        a, p = self.args, self.programs
        logits = np.empty(self.vocab, np.float32)
        decode_step(np.array(x, np.float32), pos, p.programs, p.n_steps, p.floats, p.widths, self.table, p.norms,
                    p.head_norms, p.biases, self.cache.k, self.cache.v, slots[None], self.cos, self.sin, a.n_heads,
                    a.n_kv_heads, a.head_dim, self.eps, H2F, logits, self.logits_buffer, self.routines)
        return logits


def build(blocks: list[Block], reader, args, cache, cos, sin, linears: dict) -> FusedDecoder | None:
    """A FusedDecoder running `blocks` (qformat.block.decoder) with the model's ops `linears`
    (tensor name -> op), or None if some op fills no weight-table row."""
    rows = {}
    for name in dict.fromkeys(n for b in blocks for n in b.ops()):
        rows[name] = linears[name].fused_row()
        if rows[name] is None:
            return None
    return FusedDecoder(blocks, reader, args, cache, cos, sin, rows)
