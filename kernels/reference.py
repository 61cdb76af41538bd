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
