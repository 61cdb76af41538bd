"""The model's per-token operations on the CPU, over NumPy arrays (kernels in ops.py).

One object per device with the same methods (kernels/cuda/device.py is the GPU's), so that the
model (runtime/model.py) never branches on the device."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from . import ops
from .threads import set_threads


# The kernel of each gated activation (qformat.config.ACTIVATIONS).
GLU = {"silu": ops.silu_mul_rows, "gelu_tanh": ops.gelu_tanh_mul_rows}


class CPUOps:
    """NumPy arrays; float32 KV cache."""

    name = "cpu"
    kv_dtype = np.float32

    def set_threads(self, n: int | None) -> int:
        """Kernel threads (None: all cores); BLAS runs on one (threads.py says why)."""
        return set_threads(n)

    def loading(self, reader):
        """Context of a model's load: nothing to do, the weights stay in the memory map."""
        return nullcontext()

    def asarray(self, a: np.ndarray) -> np.ndarray:
        """A host array as this device's array (here: itself)."""
        return np.asarray(a)

    def to_numpy(self, a: np.ndarray) -> np.ndarray:
        return a

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        return np.empty(shape, dtype)

    def zeros(self, shape, dtype=np.float32) -> np.ndarray:
        # np.zeros maps untouched pages lazily: a KV cache grows with the positions used
        return np.zeros(shape, dtype)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """Normalized over the last axis; x (..., d)."""
        flat = x.reshape(-1, x.shape[-1])
        out = np.empty_like(flat)
        ops.rmsnorm(flat, weight, eps, out)
        return out.reshape(x.shape)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
        """Rotate-half RoPE in place; x (n, heads, hd), cos/sin (n, hd/2)."""
        ops.rope(x, cos, sin)

    def glu(self, activation: str, gate: np.ndarray, up: np.ndarray) -> None:
        """gate <- act(gate) * up in place, act one of qformat.config.ACTIVATIONS."""
        GLU[activation](gate, up)

    def softcap(self, x: np.ndarray, cap: float) -> None:
        """x <- cap * tanh(x / cap), in place; x (n, d)."""
        ops.softcap(x, np.float32(cap))

    def sigmoid_gate_add(self, dst: np.ndarray, src: np.ndarray, gate: np.ndarray) -> None:
        """dst += sigmoid(gate) * src, in place; dst, src (n, d), gate (n, 1)."""
        ops.sigmoid_gate_add(dst, src, gate)

    def attention_decode(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray,
                         starts: np.ndarray, stops: np.ndarray, scale: float, softcap: float | None = None
                         ) -> np.ndarray:
        """One query per sequence, q (B, heads, hd), over its own cached keys of one layer of the
        paged pool (n_slots, kv, hd): positions [starts[b], stops[b]) at slots[b] (B, L) -> (B, heads, hd);
        scores soft-capped when softcap is set."""
        out = np.empty(q.shape, np.float32)
        ops.attention_decode(q, k_cache, v_cache, slots, starts, stops, np.float32(scale), np.float32(softcap or 0),
                             out)
        return out

    def attention_prefill(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
                          window: int | None, scale: float, softcap: float | None = None) -> np.ndarray:
        """Causal attention of q (n, heads, hd) at start_pos.. over k, v (start_pos + n, kv, hd)."""
        return ops.attention_prefill(q, k, v, start_pos, window, scale, softcap)
