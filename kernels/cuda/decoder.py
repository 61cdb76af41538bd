"""One decode step on the GPU with static buffers, captured once as a CUDA graph and replayed.

CuPy costs several microseconds per kernel launch from Python, and a Llama-7B step launches
~20 kernels per layer: ~700 launches, several ms, where the step's weights take ~1 ms to read.
So the step writes only into buffers allocated here, reads the position from device memory
(rope_f32_at, kv_store, attn_decode_split_at), and runs attention over a fixed number of splits
that covers the whole context (splits past the position are empty); the whole step is then one
CUDA graph, replayed per token after the position and the embedding are copied in. Where
capture fails (CUPY_... settings, an older CuPy), the same step runs eagerly.
"""
from __future__ import annotations

import numpy as np

from .device import CHUNK, THREADS
from .module import kernel

# Capture the step as a CUDA graph (tests on the host emulation turn it off).
CUDA_GRAPHS = True


def _cupy():
    import cupy

    return cupy


class CudaDecodeStep:
    """(embedding row (dim,) on the device, position) -> logits (vocab,) as a NumPy array."""

    def __init__(self, args, linears: dict, norms: dict, biases: dict, cache, cos, sin):
        cp = _cupy()
        self.args, self.cache = args, cache
        self.lin, self.norms, self.biases = linears, norms, biases
        self.cos, self.sin = cos, sin
        hd, a = args.head_dim, args
        self.x = cp.zeros(a.dim, cp.float32)
        self.xn = cp.zeros(a.dim, cp.float32)
        self.q = cp.zeros(a.n_heads * hd, cp.float32)
        self.k = cp.zeros(a.n_kv_heads * hd, cp.float32)
        self.v = cp.zeros(a.n_kv_heads * hd, cp.float32)
        self.att = cp.zeros(a.n_heads * hd, cp.float32)
        self.o = cp.zeros(a.dim, cp.float32)
        self.gate = cp.zeros(a.ffn_dim, cp.float32)
        self.up = cp.zeros(a.ffn_dim, cp.float32)
        self.logits = cp.zeros(linears["head"].out_features, cp.float32)
        self.pos = cp.zeros(1, cp.int32)
        self.n_splits = (cache.context + CHUNK - 1) // CHUNK
        self.part = cp.zeros((a.n_heads, self.n_splits, hd + 2), cp.float32)
        self.scale = np.float32(1.0 / np.sqrt(hd))
        self.window = np.int32(a.sliding_window or 0)
        self.graph = None
        self.stream = None

    def _rmsnorm(self, x, w, out, rows: int = 1):
        d = x.size // rows
        kernel("ops", "rmsnorm_f32")((rows,), (THREADS,), (x, w, out, np.int32(d), np.float32(self.args.norm_eps)))

    def _rope(self, x, heads: int):
        n = heads * self.args.head_dim // 2
        kernel("ops", "rope_f32_at")(((n + THREADS - 1) // THREADS,), (THREADS,),
                                     (x, self.cos, self.sin, np.int32(heads), np.int32(self.args.head_dim), self.pos))

    def _step(self) -> None:
        """The decode step over the static buffers (what the graph captures)."""
        cp, a, hd = _cupy(), self.args, self.args.head_dim
        kv = a.n_kv_heads * hd
        for i in range(a.n_layers):
            lin = self.lin
            self._rmsnorm(self.x, self.norms[f"layers.{i}.attn_norm"], self.xn)
            for name, out in (("wq", self.q), ("wk", self.k), ("wv", self.v)):
                lin[f"layers.{i}.attn.{name}"].gemv(self.xn, out)
                bias = self.biases.get(f"layers.{i}.attn.b{name[1]}")
                if bias is not None:
                    cp.add(out, bias, out=out)
            if a.qk_norm:
                self._rmsnorm(self.q, self.norms[f"layers.{i}.attn.q_norm"], self.q, a.n_heads)
                self._rmsnorm(self.k, self.norms[f"layers.{i}.attn.k_norm"], self.k, a.n_kv_heads)
            self._rope(self.q, a.n_heads)
            self._rope(self.k, a.n_kv_heads)
            kc, vc = self.cache.k[i], self.cache.v[i]
            kernel("ops", "kv_store")(((kv + THREADS - 1) // THREADS,), (THREADS,),
                                      (self.k, self.v, kc, vc, np.int32(kv), self.pos))
            kernel("ops", "attn_decode_split_at")(
                (a.n_heads * self.n_splits,), (THREADS,),
                (self.q, kc, vc, self.part, np.int32(a.n_heads), np.int32(a.n_kv_heads), np.int32(hd), self.pos,
                 self.window, self.scale, np.int32(self.n_splits)))
            kernel("ops", "attn_decode_combine")((a.n_heads,), (THREADS,),
                                                 (self.part, self.att, np.int32(hd), np.int32(self.n_splits)))
            lin[f"layers.{i}.attn.wo"].gemv(self.att, self.o)
            cp.add(self.x, self.o, out=self.x)
            self._rmsnorm(self.x, self.norms[f"layers.{i}.ffn_norm"], self.xn)
            lin[f"layers.{i}.ffn.w1"].gemv(self.xn, self.gate)
            lin[f"layers.{i}.ffn.w3"].gemv(self.xn, self.up)
            n = a.ffn_dim
            kernel("ops", "silu_mul_f32")(((n + THREADS - 1) // THREADS,), (THREADS,), (self.gate, self.up, np.int64(n)))
            lin[f"layers.{i}.ffn.w2"].gemv(self.gate, self.o)
            cp.add(self.x, self.o, out=self.x)
        self._rmsnorm(self.x, self.norms["norm"], self.xn)
        self.lin["head"].gemv(self.xn, self.logits)

    def _capture(self) -> None:
        cp = _cupy()
        self.stream = cp.cuda.Stream()  # ordered after the default stream's copies of x
        with self.stream:
            self._step()  # compiles every kernel before capture
            self.stream.synchronize()
            try:
                self.stream.begin_capture()
                self._step()
                self.graph = self.stream.end_capture()
            except Exception:  # capture unsupported here: run eagerly
                self.graph = None
                self.stream = None

    def __call__(self, x, pos: int) -> np.ndarray:
        cp = _cupy()
        if CUDA_GRAPHS and self.graph is None and self.stream is None:
            self._capture()
        if self.graph is not None:
            with self.stream:
                self.x[...] = x
                self.pos[...] = pos
                self.graph.launch(self.stream)
                return cp.asnumpy(self.logits, stream=self.stream)
        self.x[...] = x
        self.pos[...] = pos
        self._step()
        return cp.asnumpy(self.logits)


def build(reader, args, cache, cos, sin, linears: dict | None = None) -> CudaDecodeStep | None:
    """The GPU decode step over the Transformer's own ops (`linears`: tensor name -> op, "head"
    the output projection), or None without them."""
    if linears is None:
        return None
    cp = _cupy()

    def data(name):
        return cp.asarray(np.asarray(reader[name].arrays["data"], np.float32))

    norms = {"norm": data("norm")}
    for i in range(args.n_layers):
        for w in ("attn_norm", "ffn_norm") + (("attn.q_norm", "attn.k_norm") if args.qk_norm else ()):
            norms[f"layers.{i}.{w}"] = data(f"layers.{i}.{w}")
    biases = {}
    if args.qkv_bias:
        biases = {f"layers.{i}.attn.{b}": data(f"layers.{i}.attn.{b}")
                  for i in range(args.n_layers) for b in ("bq", "bk", "bv")}
    return CudaDecodeStep(args, linears, norms, biases, cache, cp.asarray(cos), cp.asarray(sin))
