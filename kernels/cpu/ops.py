"""Numba kernels for the small per-token operations: RMSNorm, RoPE, the gated activations (SiLU,
tanh-approximated GELU), soft caps, decode attention.

Each one is a single compiled call per layer and token (NumPy would take several ufunc calls of a
few microseconds each, which adds up over 30 layers). References: qformat.kernels.reference.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .base import FAST, PARALLEL
from .threads import run_row_chunks, run_tasks

# Queries per prefill-attention task: small blocks skip more of the causally masked keys.
QUERY_BLOCK = 128


@njit(cache=True, fastmath=FAST)
def rmsnorm(x, weight, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]**2) + eps) * weight, for x (n, d) or (n, heads, d) viewed 2-D."""
    n, d = x.shape
    for i in range(n):
        ss = np.float32(0.0)
        for j in range(d):
            ss += x[i, j] * x[i, j]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
        for j in range(d):
            out[i, j] = x[i, j] * inv * weight[j]


@njit(cache=True, fastmath=FAST)
def rope(x, cos, sin):
    """Rotate-half RoPE in place over the first 2·half dims of each head (all of them, or a
    partial rotary's): x (n, heads, head_dim); cos, sin (n, half)."""
    n, heads, hd = x.shape
    half = cos.shape[1]
    for i in range(n):
        for h in range(heads):
            for j in range(half):
                a = x[i, h, j]
                b = x[i, h, half + j]
                x[i, h, j] = a * cos[i, j] - b * sin[i, j]
                x[i, h, half + j] = b * cos[i, j] + a * sin[i, j]


@njit(cache=True, nogil=True, fastmath=FAST)
def silu_mul(gate, up):
    """gate <- silu(gate) * up, in place; (n, ffn_dim)."""
    n, d = gate.shape
    for i in range(n):
        for j in range(d):
            g = gate[i, j]
            gate[i, j] = g / (np.float32(1.0) + np.exp(-g)) * up[i, j]


def silu_mul_rows(gate: np.ndarray, up: np.ndarray) -> None:
    """silu_mul over many rows, split over the kernel threads (threads.run_tasks)."""
    run_row_chunks(lambda rows: silu_mul(gate[rows], up[rows]), gate.shape[0])


@njit(cache=True, nogil=True, fastmath=FAST)
def gelu_tanh_mul(gate, up):
    """gate <- gelu(gate) * up in place, GELU's tanh approximation
    0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g³))); (n, ffn_dim)."""
    n, d = gate.shape
    c = np.float32(np.sqrt(2.0 / np.pi))
    for i in range(n):
        for j in range(d):
            g = gate[i, j]
            gate[i, j] = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(c * (g + np.float32(0.044715) * g * g * g))) \
                * up[i, j]


def gelu_tanh_mul_rows(gate: np.ndarray, up: np.ndarray) -> None:
    """gelu_tanh_mul over many rows, split over the kernel threads."""
    run_row_chunks(lambda rows: gelu_tanh_mul(gate[rows], up[rows]), gate.shape[0])


@njit(cache=True, nogil=True, fastmath=FAST)
def softcap(x, cap):
    """x <- cap * tanh(x / cap) in place; x (n, d)."""
    n, d = x.shape
    inv = np.float32(1.0) / cap
    for i in range(n):
        for j in range(d):
            x[i, j] = cap * np.tanh(x[i, j] * inv)


@njit(cache=True, nogil=True, fastmath=FAST)
def sigmoid_gate_add(dst, src, gate):
    """dst += sigmoid(gate) * src in place; dst, src (n, d), gate (n, 1)."""
    n, d = dst.shape
    for i in range(n):
        g = np.float32(1.0) / (np.float32(1.0) + np.exp(-gate[i, 0]))
        for j in range(d):
            dst[i, j] += g * src[i, j]


@njit(cache=True, parallel=PARALLEL, fastmath=FAST)
def attention_decode(q, k_cache, v_cache, slots, starts, stops, scale, softcap, out):
    """One query token of each of B sequences against its own cached keys.

    q (B, n_heads, head_dim); k_cache, v_cache (n_slots, n_kv_heads, head_dim): one layer of the
    paged pool; slots (B, L) int32: sequence b's position p lives in slot slots[b, p]; sequence b
    attends to positions [starts[b], stops[b]); scores scaled by scale, then (softcap > 0)
    soft-capped to softcap·tanh(s / softcap); out (B, n_heads, head_dim). Query head h reads
    KV head h // (n_heads // n_kv_heads) (GQA). One task per (sequence, head).
    """
    n_seq, n_heads, hd = q.shape
    group = n_heads // k_cache.shape[1]
    for task in prange(n_seq * n_heads):
        b = task // n_heads
        h = task % n_heads
        kvh = h // group
        start = starts[b]
        n = stops[b] - start
        scores = np.empty(n, np.float32)
        best = -np.inf
        for t in range(n):
            row = slots[b, start + t]
            s = np.float32(0.0)
            for j in range(hd):
                s += q[b, h, j] * k_cache[row, kvh, j]
            s *= scale
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            scores[t] = s
            best = max(best, s)
        total = np.float32(0.0)
        for t in range(n):
            e = np.exp(scores[t] - best)
            scores[t] = e
            total += e
        for j in range(hd):
            out[b, h, j] = 0.0
        for t in range(n):
            p = scores[t] / total
            row = slots[b, start + t]
            for j in range(hd):
                out[b, h, j] += p * v_cache[row, kvh, j]


def attention_prefill(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
                      window: int | None, scale: float, softcap: float | None = None) -> np.ndarray:
    """Causal attention of n new queries over all keys so far, through BLAS.

    q (n, n_heads, hd) at positions start_pos..start_pos+n-1; k, v (start_pos+n, n_kv, hd);
    scores soft-capped to softcap·tanh(s / softcap) when softcap is set.
    Queries go in blocks of QUERY_BLOCK, one task per (block, KV head) on the kernel threads
    (threads.run_tasks): a block reads only the keys up to its last query, and the score matrix
    stays small for long prompts.
    """
    n, n_heads, hd = q.shape
    total, n_kv, _ = k.shape
    group = n_heads // n_kv
    out = np.empty((n, n_heads, hd), np.float32)
    qs = q * np.float32(scale)
    key_pos = np.arange(total)
    # scores of a block are rows (query, head of the KV group): one GEMM, no transposes; the
    # causal mask is a bias on the block's own (last) keys, the only ones a query may not see
    diagonal = np.triu(np.full((QUERY_BLOCK, QUERY_BLOCK), -np.inf, np.float32), 1)
    diagonal = np.repeat(diagonal, group, axis=0)

    def task(job: tuple[int, int]) -> None:
        b0, kvh = job
        b1 = min(n, b0 + QUERY_BLOCK)
        b = b1 - b0
        hi = start_pos + b1  # keys past the block's last query are all masked
        lo = 0 if window is None else max(0, start_pos + b0 + 1 - window)
        heads = slice(kvh * group, (kvh + 1) * group)
        s = qs[b0:b1, heads].reshape(b * group, hd) @ k[lo:hi, kvh].T  # (b·group, hi - lo)
        if softcap is not None:
            s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
        if window is None:
            s[:, hi - lo - b:] += diagonal[:b * group, :b]
        else:
            qpos = np.repeat(start_pos + np.arange(b0, b1), group)[:, None]
            s[(key_pos[None, lo:hi] > qpos) | (key_pos[None, lo:hi] <= qpos - window)] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        o = s @ v[lo:hi, kvh]  # normalized after the product: (b·group, hd) values, not scores
        o /= s.sum(axis=-1, keepdims=True)
        out[b0:b1, heads] = o.reshape(b, group, hd)

    run_tasks(task, [(b0, kvh) for b0 in range(0, n, QUERY_BLOCK) for kvh in range(n_kv)])
    return out
