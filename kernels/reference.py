"""Pure NumPy references of every kernel (CPU and CUDA); tests compare the compiled kernels against
these. Which weights a backend runs on int8 activations is the rule of kernels.layouts.q8act."""
from __future__ import annotations

import numpy as np

from qformat.schemes import Tensor, group_scales

from .layouts import A8, NM, form_of, q8act, w8a8_static


def linear(t: Tensor, x: np.ndarray) -> np.ndarray:
    """x (..., in) @ W.T through the kind's NumPy dequantization."""
    return np.asarray(x, np.float32) @ t.dequantize().T


def decode_reference(t: Tensor, x: np.ndarray) -> np.ndarray:
    """W @ x (x (in,)) as every backend's decode GEMV computes it for t's layout: W8A8 per spec
    §6.5, int8 activations where kernels.layouts.q8act says so, else float."""
    form = form_of(t)
    if form == A8:
        return linear_w8a8(t, x[None])[0]
    if q8act(t.kind, min(t.group_size, t.shape[1]), sparse=form == NM):
        return (gemv_nm_q8act_reference if form == NM else gemv_q8act_reference)(t, x)
    return linear(t, x[None])[0]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE over the first 2·half dims of each head, the rest as they are:
    x (n, heads, hd), cos/sin (n, half)."""
    half = cos.shape[-1]
    a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, b * c + a * s, rest], axis=-1)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return gate / (1.0 + np.exp(-gate)) * up


def gelu_tanh_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation of gate, times up (GeGLU)."""
    g = np.asarray(gate, np.float64)
    return (0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3))) * up).astype(np.float32)


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    return (cap * np.tanh(np.asarray(x, np.float64) / cap)).astype(np.float32)


def sigmoid_gate(src: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """sigmoid(gate) · src per row: src (n, d), gate (n, 1) (qformat.block.SigmoidGate's term)."""
    g = np.asarray(gate, np.float64)
    return (np.asarray(src, np.float64) / (1.0 + np.exp(-g))).astype(np.float32)


def route(logits: np.ndarray, top_k: int, norm_topk: bool) -> tuple[np.ndarray, np.ndarray]:
    """A mixture's routing (qformat.block.Moe) of logits (n, n_experts): (experts (n, top_k)
    int64, their weights (n, top_k) float32), each token's experts in descending probability
    (softmax in float32, renormalized over the chosen with norm_topk), as transformers routes."""
    z = np.asarray(logits, np.float32)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    experts = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(p, experts, axis=-1)
    if norm_topk:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return experts, weights.astype(np.float32)


# Each gated activation of qformat.config.ACTIVATIONS.
GLU = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, window: int | None,
              scale: float, cap: float | None = None) -> np.ndarray:
    """Causal GQA attention, one head at a time, scores soft-capped with cap when given.
    q (n, H, hd); k, v (start_pos + n, KV, hd)."""
    n, n_heads, hd = q.shape
    group = n_heads // k.shape[1]
    out = np.zeros_like(q)
    for i in range(n):
        pos = start_pos + i
        lo = 0 if window is None else max(0, pos - window + 1)
        for h in range(n_heads):
            s = k[lo:pos + 1, h // group] @ q[i, h] * scale
            if cap is not None:
                s = softcap(s, cap)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[lo:pos + 1, h // group]
    return out


def quantize_activations(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """x (k,) -> (codes (k,) int64 in [-127, 127], scales (n_groups,) float32), per `group` columns:
    scale = max|x| / 127 in float32, code = round-half-even(x / scale); an all-zero group gets
    scale 0 and codes 0. The model of the int8 activations of the CPU's 4-bit GEMV."""
    x = np.asarray(x, np.float32)
    k = x.shape[0]
    n_groups = -(-k // group)
    pad = np.zeros(n_groups * group, np.float32)
    pad[:k] = x
    xg = pad.reshape(n_groups, group)
    d = (np.abs(xg).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(d > 0, d, np.float32(1.0))
    q = np.clip(np.rint(xg / safe[:, None]), -127, 127).astype(np.int64)
    q[d == 0] = 0
    return q.reshape(-1)[:k], d


def dense_input(a: dict, x: np.ndarray) -> np.ndarray:
    """The input of a weight's dense part (spec §6.4): x with the 16-bit columns zeroed, in stored
    column order. The dense weights are zero there, so float products do not change; activations
    quantized per group are then scaled by the ordinary channels, not by an outlier."""
    if "fp_cols" in a:
        x = x.copy()
        x[np.asarray(a["fp_cols"], np.int64)] = 0.0
    return x[a["perm"]] if "perm" in a else x


def _add_sidecars(a: dict, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (rows,) float64 += sparse outliers · x and 16-bit columns · x (x unquantized, original
    channel order), as a GEMV adds them after its dense part."""
    if "outlier_rowptr" in a:
        row_of = np.repeat(np.arange(out.size), np.diff(np.asarray(a["outlier_rowptr"], np.int64)))
        np.add.at(out, row_of, np.asarray(a["outlier_values"], np.float64) * x[np.asarray(a["outlier_cols"], np.int64)])
    if "fp_cols" in a:
        out += np.asarray(a["fp_weight"], np.float64) @ x[np.asarray(a["fp_cols"], np.int64)]
    return out


def gemv_q8act_reference(t: Tensor, x: np.ndarray, act_group: int | None = None) -> np.ndarray:
    """W @ x as the CPU's int8-activation kernels compute it (the q4 GEMV, the q4/q8 prefill
    GEMM): the activations, in stored column order with the 16-bit columns zeroed (dense_input),
    quantized by `quantize_activations` per `act_group` columns (default: the weight group; an
    activation group lies inside one weight group); the codes' dot products exact in integers;
    each activation group scaled by weight scale x activation scale; sidecars (outliers, 16-bit
    columns) added in float from the unquantized x."""
    from qformat.packing import unpack_codes
    from qformat.schemes import KINDS

    a = t.arrays
    rows, k = t.shape
    group = min(t.group_size, k)
    act_group = act_group or group
    bits = KINDS[t.kind].bits
    x = np.asarray(x, np.float32)
    q, d = quantize_activations(dense_input(a, x), act_group)
    scales = group_scales(t)
    codes = unpack_codes(np.asarray(a["codes"]), k, group, bits).astype(np.int64)  # (rows, k)
    n_groups = -(-k // group)
    z = (np.asarray(a["zeros"], np.int64) if "zeros" in a
         else np.zeros((rows, n_groups), np.int64) if "offsets" in a
         else np.full((rows, n_groups), 2 ** (bits - 1), np.int64))
    cols = np.arange(k) // act_group
    out = np.zeros(rows, np.float64)
    for ga in range(d.size):
        sel = cols == ga
        g = ga * act_group // group
        dots = (codes[:, sel] - z[:, g:g + 1]) @ q[sel]  # exact integers
        out += np.asarray(scales[:, g], np.float64) * np.float64(d[ga]) * dots
        if "offsets" in a:  # spec §4.2: o times the sum of the same rounded activations
            out += np.asarray(a["offsets"][:, g], np.float64) * np.float64(d[ga]) * q[sel].sum()
    return _add_sidecars(a, x, out).astype(np.float32)


def quantize_tokens(x: np.ndarray, act_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x (n, k) -> (codes (n, k) int64 in [-127, 127], scales (n,) float32): one scale per token
    (row). Dynamic (act_scale None): scale = max|x| / 127 in float32, a zero row gets scale 0 and
    codes 0; static: the given scale for every row, codes saturate at ±127. code =
    round-half-even(x / scale) in float32. The int8 activations of W8A8 (spec §6.5)."""
    x = np.atleast_2d(np.asarray(x, np.float32))
    if act_scale is None:
        d = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)
    else:
        d = np.full(x.shape[0], act_scale, np.float32)
    safe = np.where(d > 0, d, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int64)
    q[d == 0] = 0
    return q, d


def w8a8_inputs(t: Tensor, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x / input_scale, the same with the 16-bit columns zeroed): what the W8A8 product sees.
    The 16-bit columns (LLM.int8()) are left out of the int8 part, so their large values do not
    set the token's scale; the dense part stores zero weights there anyway (spec §6.4)."""
    a = t.arrays
    x = np.atleast_2d(np.asarray(x, np.float32))
    if "input_scale" in a:
        x = (x / np.asarray(a["input_scale"], np.float32)).astype(np.float32)
    xi = x
    if "fp_cols" in a:
        xi = x.copy()
        xi[:, np.asarray(a["fp_cols"], np.int64)] = 0.0
    return x, xi


def linear_w8a8(t: Tensor, x: np.ndarray) -> np.ndarray:
    """x (n, in) @ W.T as spec §6.5 defines it for a tensor with `activation` (W8A8):
    x' = x / input_scale; the int8 part is dequant(W_dense) applied to the per-token int8
    quantization of x' (16-bit columns zeroed; static mode: the stored act_scale); sparse
    outliers and 16-bit columns are added in float from x'. Products summed in float64 (exact
    for the integer dot products a kernel computes), returned as float32."""
    from qformat.schemes import KINDS

    a = t.arrays
    rows, k = t.shape
    x, xi = w8a8_inputs(t, x)
    static = w8a8_static(t)
    q, d = quantize_tokens(xi, float(a["act_scale"][0]) if static else None)
    kind = KINDS[t.kind]
    dense_roles = ("codes", "scales", "scale_exp", "zeros", "perm", "sparse_index")
    dense = kind.dequantize(Tensor(t.name, t.kind, t.shape, {r: v for r, v in a.items() if r in dense_roles},
                                   t.group_size, t.symmetric, t.sparsity))
    out = (q.astype(np.float64) * d.astype(np.float64)[:, None]) @ dense.astype(np.float64).T
    if "outlier_rowptr" in a:
        row_of = np.repeat(np.arange(rows), np.diff(np.asarray(a["outlier_rowptr"], np.int64)))
        cols = np.asarray(a["outlier_cols"], np.int64)
        vals = np.asarray(a["outlier_values"], np.float64)
        for i in range(x.shape[0]):
            np.add.at(out[i], row_of, vals * x[i, cols])
    if "fp_cols" in a:
        out += x[:, np.asarray(a["fp_cols"], np.int64)].astype(np.float64) @ np.asarray(a["fp_weight"], np.float64).T
    return out.astype(np.float32)


def gemv_nm_q8act_reference(t: Tensor, x: np.ndarray) -> np.ndarray:
    """W @ x as the CPU's n:m sparse 4-bit GEMV computes it (kernels/cpu/sparse.py): the
    activations, in stored column order, quantized per G input columns by
    `quantize_activations`; per group the exact integer sum of (code - zero) times the int8
    activation of each kept value's column; scaled by weight scale x activation scale; sidecars
    (outliers, 16-bit columns) added in float from the unquantized x."""
    from qformat.packing import unpack_codes
    from qformat.schemes import KINDS, unpack_nm_index

    a = t.arrays
    rows, k = t.shape
    n, m = t.sparsity
    group = min(t.group_size, k)
    kc, gc = k * n // m, group * n // m
    bits = KINDS[t.kind].bits
    x = np.asarray(x, np.float32)
    q, d = quantize_activations(dense_input(a, x), group)
    scales = group_scales(t)
    codes = unpack_codes(np.asarray(a["codes"]), kc, gc, bits).astype(np.int64)  # (rows, kc)
    cols = (np.arange(kc) // n) * m + unpack_nm_index(np.asarray(a["sparse_index"]), kc, m)  # (rows, kc)
    n_groups = d.size
    z = (np.asarray(a["zeros"], np.int64) if "zeros" in a
         else np.full((rows, n_groups), 2 ** (bits - 1), np.int64))
    kept_group = np.arange(kc) // gc
    out = np.zeros(rows, np.float64)
    for g in range(n_groups):
        sel = kept_group == g
        dots = ((codes[:, sel] - z[:, g:g + 1]) * q[cols[:, sel]]).sum(axis=1)  # exact integers
        out += np.asarray(scales[:, g], np.float64) * np.float64(d[g]) * dots
    return _add_sidecars(a, x, out).astype(np.float32)
