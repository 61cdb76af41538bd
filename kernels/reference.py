"""Pure NumPy references of every CPU kernel; tests compare the compiled kernels against these."""
from __future__ import annotations

import numpy as np

from qformat.schemes import Tensor


def linear(t: Tensor, x: np.ndarray) -> np.ndarray:
    """x (..., in) @ W.T through the kind's NumPy dequantization."""
    return np.asarray(x, np.float32) @ t.dequantize().T


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE: x (n, heads, hd), cos/sin (n, hd/2)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return gate / (1.0 + np.exp(-gate)) * up


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, window: int | None,
              scale: float) -> np.ndarray:
    """Causal GQA attention, one head at a time. q (n, H, hd); k, v (start_pos + n, KV, hd)."""
    n, n_heads, hd = q.shape
    group = n_heads // k.shape[1]
    out = np.zeros_like(q)
    for i in range(n):
        pos = start_pos + i
        lo = 0 if window is None else max(0, pos - window + 1)
        for h in range(n_heads):
            s = k[lo:pos + 1, h // group] @ q[i, h] * scale
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


def gemv_q8act_reference(t: Tensor, x: np.ndarray) -> np.ndarray:
    """W @ x as the CPU's int8-activation GEMV computes it (q4 kinds): the activations, in stored
    column order, quantized per weight group by `quantize_activations`; the codes' dot products
    exact in integers; each group scaled by weight scale x activation scale; sidecars (outliers,
    16-bit columns) added in float from the unquantized x."""
    from qformat.packing import unpack_codes
    from qformat.schemes import KINDS

    a = t.arrays
    rows, k = t.shape
    group = min(t.group_size, k)
    bits = KINDS[t.kind].bits
    x = np.asarray(x, np.float32)
    xs = x[a["perm"]] if "perm" in a else x
    q, d = quantize_activations(xs, group)
    codes = unpack_codes(np.asarray(a["codes"]), k, group, bits).astype(np.int64)  # (rows, k)
    n_groups = d.size
    z = (np.asarray(a["zeros"], np.int64) if "zeros" in a
         else np.full((rows, n_groups), 2 ** (bits - 1), np.int64))
    cols = np.arange(k) // group
    out = np.zeros(rows, np.float64)
    for g in range(n_groups):
        sel = cols == g
        dots = (codes[:, sel] - z[:, g:g + 1]) @ q[sel]  # exact integers
        out += np.asarray(a["scales"][:, g], np.float64) * np.float64(d[g]) * dots
    if "outlier_rowptr" in a:
        row_of = np.repeat(np.arange(rows), np.diff(np.asarray(a["outlier_rowptr"], np.int64)))
        np.add.at(out, row_of, np.asarray(a["outlier_values"], np.float64) * x[np.asarray(a["outlier_cols"], np.int64)])
    if "fp_cols" in a:
        out += np.asarray(a["fp_weight"], np.float64) @ x[np.asarray(a["fp_cols"], np.int64)]
    return out.astype(np.float32)
