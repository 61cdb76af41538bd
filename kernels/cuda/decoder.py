"""One decode step on the GPU with static buffers, captured once as a CUDA graph and replayed.

CuPy costs several microseconds per kernel launch from Python, and a Llama-7B step launches
~500 kernels, several ms, where the step's weights take ~1 ms to read. Per layer: two RMSNorms,
one int8 quantization of each normalized input shared by the projections that read it (4-bit
weights), seven GEMVs (the residual adds and biases folded into them), RoPE fused with the KV
cache store, two attention passes and the SiLU gate: 15 kernels (13 without int8 activations).
Even replayed from a graph, each kernel costs a few microseconds of launch and tail, so fewer is
faster. The step writes only into buffers allocated here, reads the position from device memory
(rope_store_at, attn_decode_split_at), and runs attention over a fixed number of splits
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

    def _project(self, names: tuple, x, outs: tuple, add: tuple) -> None:
        """outs[i] = lin[names[i]] @ x + add[i] (None: nothing added); x quantized once where the
        ops would all quantize it alike (CudaGroupQuantOp.shared_input)."""
        ops = [self.lin[n] for n in names]
        key = ops[0].shared_input
        quantized = ops[0].quantize(x) if key is not None and all(op.shared_input == key for op in ops) else None
        for op, out, a in zip(ops, outs, add):
            op.gemv(x, out, a, quantized)

    def _step(self) -> None:
        """The decode step over the static buffers (what the graph captures)."""
        a, hd = self.args, self.args.head_dim
        for i in range(a.n_layers):
            p = f"layers.{i}."
            self._rmsnorm(self.x, self.norms[p + "attn_norm"], self.xn)
            self._project((p + "attn.wq", p + "attn.wk", p + "attn.wv"), self.xn, (self.q, self.k, self.v),
                          tuple(self.biases.get(p + f"attn.b{w}") for w in "qkv"))
            if a.qk_norm:
                self._rmsnorm(self.q, self.norms[p + "attn.q_norm"], self.q, a.n_heads)
                self._rmsnorm(self.k, self.norms[p + "attn.k_norm"], self.k, a.n_kv_heads)
            kc, vc = self.cache.k[i], self.cache.v[i]
            pairs = (a.n_heads + a.n_kv_heads) * hd // 2
            kernel("ops", "rope_store_at")(((pairs + THREADS - 1) // THREADS,), (THREADS,),
                                           (self.q, self.k, self.v, self.cos, self.sin, kc, vc, np.int32(a.n_heads),
                                            np.int32(a.n_kv_heads), np.int32(hd), self.pos))
            kernel("ops", "attn_decode_split_at")(
                (a.n_heads * self.n_splits,), (THREADS,),
                (self.q, kc, vc, self.part, np.int32(a.n_heads), np.int32(a.n_kv_heads), np.int32(hd), self.pos,
                 self.window, self.scale, np.int32(self.n_splits)))
            kernel("ops", "attn_decode_combine")((a.n_heads,), (THREADS,),
                                                 (self.part, self.att, np.int32(hd), np.int32(self.n_splits)))
            self.lin[p + "attn.wo"].gemv(self.att, self.x, self.x)  # the residual add in the GEMV
            self._rmsnorm(self.x, self.norms[p + "ffn_norm"], self.xn)
            self._project((p + "ffn.w1", p + "ffn.w3"), self.xn, (self.gate, self.up), (None, None))
            n = a.ffn_dim
            kernel("ops", "silu_mul_f32")(((n + THREADS - 1) // THREADS,), (THREADS,), (self.gate, self.up, np.int64(n)))
            self.lin[p + "ffn.w2"].gemv(self.gate, self.x, self.x)
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
