"""A Llama-family decoder over the tensors of a qbin file, read in place from the memory map.

Reads like the paper: Transformer -> Block -> (Attention, FeedForward), with RMSNorm and a KVCache.
Architecture differences (q/k/v bias, q/k norm, sliding window, RoPE scaling) are fields of
ModelArgs, not branches on the architecture's name. Every weight goes through the (device, kind)
kernel table, so the model never looks at a quantization scheme.
"""
from __future__ import annotations

import math

import numpy as np

from qformat.config import ModelArgs
from qformat.kernels import device_ops, fused_decoder, linear_op
from qformat.kernels.cpu.ops import rope_tables
from qformat.reader import QbinReader


# Prompts shorter than this run through the fused decode step (when there is one).
FUSED_PROMPT_TOKENS = 8


class Linear:
    """y = W x (+ b) for a qbin weight, through the kernel registered for its kind."""

    def __init__(self, reader: QbinReader, name: str, device: str, bias: str | None = None):
        self.op = linear_op(device, reader[name])
        self.ops = device_ops(device)
        self.out_features = self.op.out_features
        self.bias = self.ops.asarray(reader[bias].arrays["data"]) if bias is not None else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (n, in) -> (n, out)."""
        if x.shape[0] == 1:
            out = self.ops.empty((1, self.out_features))
            self.op.gemv(x[0], out[0])
        else:
            out = self.op.gemm(x)
        if self.bias is not None:
            out += self.bias
        return out


class RMSNorm:
    def __init__(self, weight: np.ndarray, eps: float, device: str = "cpu"):
        self.ops = device_ops(device)
        self.weight = self.ops.asarray(weight)  # (d,) float32 (on the CPU: a view of the file)
        self.eps = eps

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Normalize over the last axis; x (..., d)."""
        return self.ops.rmsnorm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of every position so far, preallocated for the whole context (the
    device's KV dtype: float32 on the CPU, float16 on a GPU)."""

    def __init__(self, args: ModelArgs, context: int, device: str = "cpu"):
        shape = (args.n_layers, context, args.n_kv_heads, args.head_dim)
        ops = device_ops(device)
        self.k = ops.zeros(shape, ops.kv_dtype)  # (n_layers, max_seq, n_kv_heads, head_dim)
        self.v = ops.zeros(shape, ops.kv_dtype)
        self.context = context

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """RoPE inverse frequencies (head_dim / 2,), with linear or Llama 3 scaling, in float32."""
    hd = args.head_dim
    inv = (1.0 / (args.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))).astype(np.float32)
    sc = args.rope_scaling
    if sc is None:
        return inv
    if sc.kind == "linear":
        return (inv / np.float32(sc.factor)).astype(np.float32)
    if sc.kind == "llama3":
        low_wavelen = sc.original_max_position / sc.low_freq_factor
        high_wavelen = sc.original_max_position / sc.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
        smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise NotImplementedError(f"RoPE scaling kind {sc.kind!r} is not supported (known: linear, llama3)")


class Attention:
    def __init__(self, reader: QbinReader, i: int, args: ModelArgs, device: str):
        p = f"layers.{i}.attn."
        bias = (lambda n: p + n) if args.qkv_bias else (lambda n: None)
        self.wq = Linear(reader, p + "wq", device, bias("bq"))
        self.wk = Linear(reader, p + "wk", device, bias("bk"))
        self.wv = Linear(reader, p + "wv", device, bias("bv"))
        self.wo = Linear(reader, p + "wo", device)
        qk_norm = args.qk_norm
        self.q_norm = RMSNorm(reader[p + "q_norm"].arrays["data"], args.norm_eps, device) if qk_norm else None
        self.k_norm = RMSNorm(reader[p + "k_norm"].arrays["data"], args.norm_eps, device) if qk_norm else None
        self.ops = device_ops(device)
        self.layer = i
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.scale = np.float32(1.0 / math.sqrt(args.head_dim))

    def __call__(self, x: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray, cache: KVCache) -> np.ndarray:
        """x (n, dim) at positions pos..pos+n-1 -> (n, dim); appends k, v to the cache."""
        n = x.shape[0]
        q = self.wq(x).reshape(n, self.n_heads, self.hd)
        k = self.wk(x).reshape(n, self.n_kv, self.hd)
        v = self.wv(x).reshape(n, self.n_kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        self.ops.rope(q, cos, sin)
        self.ops.rope(k, cos, sin)
        kc, vc = cache.k[self.layer], cache.v[self.layer]  # (max_seq, n_kv_heads, head_dim)
        kc[pos:pos + n] = k
        vc[pos:pos + n] = v
        if n == 1:
            start = 0 if self.window is None else max(0, pos + 1 - self.window)
            out = self.ops.attention_decode(q[0], kc, vc, start, pos + 1, float(self.scale))
        else:
            out = self.ops.attention_prefill(q, kc[:pos + n], vc[:pos + n], pos, self.window, float(self.scale))
        return self.wo(out.reshape(n, self.n_heads * self.hd))


class FeedForward:
    def __init__(self, reader: QbinReader, i: int, device: str):
        p = f"layers.{i}.ffn."
        self.w1 = Linear(reader, p + "w1", device)  # gate
        self.w3 = Linear(reader, p + "w3", device)  # up
        self.w2 = Linear(reader, p + "w2", device)  # down
        self.ops = device_ops(device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        gate = self.w1(x)
        self.ops.silu_mul(gate, self.w3(x))
        return self.w2(gate)


class Block:
    def __init__(self, reader: QbinReader, i: int, args: ModelArgs, device: str):
        self.attn_norm = RMSNorm(reader[f"layers.{i}.attn_norm"].arrays["data"], args.norm_eps, device)
        self.attn = Attention(reader, i, args, device)
        self.ffn_norm = RMSNorm(reader[f"layers.{i}.ffn_norm"].arrays["data"], args.norm_eps, device)
        self.ffn = FeedForward(reader, i, device)

    def __call__(self, x, pos, cos, sin, cache):
        h = x + self.attn(self.attn_norm(x), pos, cos, sin, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer:
    """The whole decoder. forward(tokens, pos) -> next-token logits; keeps its own KV cache."""

    def __init__(self, reader: QbinReader, device: str = "cpu", context: int | None = None, fused: bool = True):
        args = reader.model
        self.args = args
        self.context = min(args.max_seq_len, context or args.max_seq_len)
        self.ops = device_ops(device)
        with self.ops.loading(reader):  # a GPU copies the weights up here, layer by layer
            self.tok_embeddings = linear_op(device, reader["tok_embeddings"])  # (vocab, dim)
            self.layers = [Block(reader, i, args, device) for i in range(args.n_layers)]
            self.norm = RMSNorm(reader["norm"].arrays["data"], args.norm_eps, device)
            head = "output" if "output" in reader else "tok_embeddings"  # absent: tied to the embeddings
            self.output = Linear(reader, head, device)  # (vocab, dim)
        self.cos, self.sin = rope_tables(rope_inv_freq(args), self.context)  # (context, head_dim/2)
        self._cos, self._sin = self.ops.asarray(self.cos), self.ops.asarray(self.sin)  # on the device
        self.cache = KVCache(args, self.context, device)
        # one call per decode step when the device offers it (kernels/cpu/fused.py: one compiled
        # function; kernels/cuda/decoder.py: one CUDA graph over these ops)
        linears = {f"layers.{i}.{part}.{w}": getattr(getattr(block, part), w).op
                   for i, block in enumerate(self.layers)
                   for part, ws in (("attn", ("wq", "wk", "wv", "wo")), ("ffn", ("w1", "w3", "w2"))) for w in ws}
        linears["head"] = self.output.op
        self.fused = fused_decoder(device, reader, args, self.cache, self.cos, self.sin, linears) if fused else None

    def forward(self, tokens, pos: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens (n,) at positions pos..pos+n-1 through the model, filling the KV cache.

        Returns the logits (vocab,) after the last token, or (n, vocab) with all_logits.
        """
        tokens = np.asarray(tokens, np.int64)
        n = tokens.size
        if pos + n > self.context:
            raise ValueError(f"{pos + n} tokens exceed the context of {self.context}")
        x = self.tok_embeddings.rows(tokens)  # (n, dim)
        if self.fused is not None and (n == 1 or (n < FUSED_PROMPT_TOKENS and not all_logits)):
            # short prompts go token by token through the one-call step: as fast as the
            # per-op path there, and a cold start then loads one compiled function, not ten
            for i in range(n):
                logits = self.fused(x[i], pos + i)
            return logits[None] if all_logits else logits
        cos, sin = self._cos[pos:pos + n], self._sin[pos:pos + n]
        for block in self.layers:
            x = block(x, pos, cos, sin, self.cache)
        if not all_logits:
            x = x[-1:]
        logits = self.ops.to_numpy(self.output(self.norm(x)))
        return logits if all_logits else logits[0]
