"""The model's per-token operations on an NVIDIA GPU, over CuPy arrays (kernels in ops.cu), with
the methods of kernels/cpu/device.py. The KV cache is float16."""
from __future__ import annotations

import numpy as np

from qformat.schemes import FILE_KINDS

from . import module
from .upload import uploading

# Threads per block of the row and attention kernels (a multiple of 32).
THREADS = 128
# ops.cu's CHUNK: keys per attention split.
CHUNK = 256
# The ops.cu kernel of each gated activation (qformat.config.ACTIVATIONS).
GLU_KERNELS = {"silu": "silu_mul_f32", "gelu_tanh": "gelu_tanh_mul_f32"}


def _in_place(*arrays) -> None:
    # raw kernels index arrays as C-contiguous; an in-place result cannot go through a copy
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("CUDA kernels write in place only into C-contiguous arrays")


class CUDAOps:
    """CuPy arrays on the current device."""

    name = "cuda"
    kv_dtype = np.float16

    def set_threads(self, n: int | None) -> None:
        """Nothing to set: the host only launches kernels."""

    def loading(self, reader):
        """Context of a model's load: weights staged to the device through pinned memory, with a
        progress bar for large files (upload.py)."""
        tensors = [reader[name] for name in reader.names()]
        return uploading(sum(t.nbytes for t in tensors if t.kind not in FILE_KINDS))

    def asarray(self, a):
        return module.cupy().asarray(a)

    def to_numpy(self, a) -> np.ndarray:
        return module.cupy().asnumpy(a)

    def empty(self, shape, dtype=np.float32):
        return module.cupy().empty(shape, dtype)

    def zeros(self, shape, dtype=np.float32):
        return module.cupy().zeros(shape, dtype)

    def rmsnorm(self, x, weight, eps: float):
        d = x.shape[-1]
        flat = module.cupy().ascontiguousarray(x).reshape(-1, d)
        out = module.cupy().empty_like(flat)
        module.kernel("ops", "rmsnorm_f32")((flat.shape[0],), (THREADS,),
                                            (flat, weight, out, np.int32(d), np.float32(eps), np.int32(0)))
        return out.reshape(x.shape)

    def rope(self, x, cos, sin) -> None:
        """In place; x (n, heads, hd) contiguous, cos/sin (n, half) for its positions: RoPE on
        the first 2·half dims of each head."""
        _in_place(x)
        n, heads, hd = x.shape
        half = cos.shape[-1]
        total = n * heads * half
        cos, sin = module.cupy().ascontiguousarray(cos), module.cupy().ascontiguousarray(sin)
        module.kernel("ops", "rope_f32")(((total + THREADS - 1) // THREADS,), (THREADS,),
                                  (x, cos, sin, np.int32(n), np.int32(heads), np.int32(hd), np.int32(0),
                                   np.int32(half)))

    def _gated(self, kernel: str, gate, up) -> None:
        _in_place(gate)
        up = module.cupy().ascontiguousarray(up)
        n = gate.size
        module.kernel("ops", kernel)(((n + THREADS - 1) // THREADS,), (THREADS,), (gate, up, np.int64(n)))

    def glu(self, activation: str, gate, up) -> None:
        """gate <- act(gate) * up in place, act one of qformat.config.ACTIVATIONS."""
        self._gated(GLU_KERNELS[activation], gate, up)

    def softcap(self, x, cap: float) -> None:
        """x <- cap * tanh(x / cap), in place."""
        _in_place(x)
        module.kernel("ops", "softcap_f32")(((x.size + THREADS - 1) // THREADS,), (THREADS,),
                                            (x, np.int64(x.size), np.float32(cap)))

    def sigmoid_gate_add(self, dst, src, gate) -> None:
        """dst += sigmoid(gate) * src, in place; dst, src (n, d), gate (n, 1)."""
        _in_place(dst)
        cp = module.cupy()
        src, gate = cp.ascontiguousarray(src), cp.ascontiguousarray(gate)
        n, d = dst.shape[0], dst.size // dst.shape[0]
        module.kernel("ops", "sigmoid_gate_add_f32")(((dst.size + THREADS - 1) // THREADS,), (THREADS,),
                                                     (dst, src, gate, np.int64(n), np.int32(d)))

    def attention_decode(self, q, k_cache, v_cache, slots, starts, stops, scale: float, softcap: float | None = None):
        """One query per sequence, q (B, heads, hd), over its own positions [starts[b], stops[b])
        at slots[b] (B, L) int32 of one layer's pool (n_slots, kv, hd) -> (B, heads, hd). One
        flash-decoding pass pair per sequence (launched eagerly)."""
        cp = module.cupy()
        q = cp.ascontiguousarray(q)
        slots = cp.ascontiguousarray(cp.asarray(slots, cp.int32))
        _in_place(k_cache, v_cache)
        n_seq, n_heads, hd = q.shape
        n_kv = k_cache.shape[1]
        out = cp.empty((n_seq, n_heads, hd), cp.float32)
        for b in range(n_seq):
            start, stop = int(starts[b]), int(stops[b])
            n_splits = (stop - start + CHUNK - 1) // CHUNK
            part = cp.empty((n_heads, n_splits, hd + 2), cp.float32)
            module.kernel("ops", "attn_decode_split")((n_heads * n_splits,), (THREADS,),
                                                      (q[b], k_cache, v_cache, slots[b], part, np.int32(n_heads),
                                                       np.int32(n_kv), np.int32(hd), np.int32(start), np.int32(stop),
                                                       np.float32(scale), np.float32(softcap or 0),
                                                       np.int32(n_splits)))
            module.kernel("ops", "attn_decode_combine")((n_heads,), (THREADS,),
                                                        (part, out[b], np.int32(hd), np.int32(n_splits)))
        return out

    def attention_prefill(self, q, k, v, start_pos: int, window: int | None, scale: float,
                          softcap: float | None = None):
        """Per KV head: the scores of its query heads as one batched GEMM (cuBLAS), soft-capped
        when softcap is set, masked and normalized in float32, times V."""
        cp = module.cupy()
        n, n_heads, hd = q.shape
        total, n_kv, _ = k.shape
        group = n_heads // n_kv
        qpos = cp.arange(start_pos, start_pos + n)[:, None]
        kpos = cp.arange(total)[None, :]
        masked = kpos > qpos
        if window is not None:
            masked |= kpos <= qpos - window
        out = cp.empty((n, n_heads, hd), cp.float32)
        for kvh in range(n_kv):
            heads = slice(kvh * group, (kvh + 1) * group)
            kh = k[:, kvh].astype(cp.float32)
            vh = v[:, kvh].astype(cp.float32)
            s = cp.matmul(q[:, heads].transpose(1, 0, 2), kh.T) * np.float32(scale)  # (group, n, total)
            if softcap is not None:
                s = np.float32(softcap) * cp.tanh(s / np.float32(softcap))
            s = cp.where(masked[None], np.float32(-np.inf), s)
            s -= s.max(axis=-1, keepdims=True)
            p = cp.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            out[:, heads] = cp.matmul(p, vh).transpose(1, 0, 2)
        return out
