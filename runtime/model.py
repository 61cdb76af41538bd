"""The decoder over the tensors of a qbin file, read in place from the memory map.

What the model computes is qformat.block's description (the steps of every block, in order);
this module runs it one operation at a time, over (tokens, width) arrays, for prefill and for
devices or files without a one-call decode step. Each step kind has a small class here, and
architecture differences arrive as the steps' fields, never as branches on the architecture.
Every weight goes through the (device, kind, form) kernel table, so the model never looks at a
quantization scheme; every array operation goes through the device's ops, so it never branches
on the device either.
"""
from __future__ import annotations

import numpy as np

from qformat import block as B
from qformat.config import ModelArgs
from qformat.kernels import device_ops, fused_decoder, linear_op
from qformat.reader import QbinReader
from qformat.rope import rope_inv_freq, rope_tables
from qformat.tensors import TOK_EMBEDDINGS

# Prompts shorter than this run through the fused decode step (when there is one).
FUSED_PROMPT_TOKENS = 8


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


class Model:
    """What a step needs from the model being built: the file, the device's ops, the weights'
    ops by tensor name (each built once, so a tied head shares the embeddings' op), the RoPE
    tables and the KV cache."""

    def __init__(self, reader: QbinReader, device: str, context: int):
        self.reader = reader
        self.args = reader.model
        self.device = device
        self.ops = device_ops(device)
        self.linears: dict[str, object] = {}
        self.cos, self.sin = rope_tables(rope_inv_freq(self.args), context)  # (context, head_dim/2)
        self.cos_dev, self.sin_dev = self.ops.asarray(self.cos), self.ops.asarray(self.sin)
        self.cache = KVCache(self.args, context, device)

    def linear(self, name: str):
        if name not in self.linears:
            self.linears[name] = linear_op(self.device, self.reader[name])
        return self.linears[name]

    def vector(self, name: str):
        """A norm weight or bias (float32) on the device (on the CPU: a view of the file)."""
        return self.ops.asarray(self.reader[name].arrays["data"])


# ---------------------------------------------------------------------------- the steps
# Each runs one qformat.block step over `bufs` (buffer name -> (n, width) array) for n tokens at
# positions pos..pos+n-1; cos and sin are the tables' rows for those positions.

class RMSNorm:
    """Norm: dst = RMSNorm(src) · weight; HeadNorm: the same over every head_dim slice, in place."""

    def __init__(self, step: B.Norm | B.HeadNorm, model: Model, layer: int):
        self.weight = model.vector(step.weight)  # (d,)
        self.src = step.src if isinstance(step, B.Norm) else step.buf
        self.dst = step.dst if isinstance(step, B.Norm) else step.buf
        self.per_head = model.args.head_dim if isinstance(step, B.HeadNorm) else None
        self.eps = model.args.norm_eps
        self.ops = model.ops

    def __call__(self, bufs, pos, cos, sin) -> None:
        x = bufs[self.src]
        if self.per_head is not None:
            x = x.reshape(x.shape[0], -1, self.per_head)
        bufs[self.dst] = self.ops.rmsnorm(x, self.weight, self.eps).reshape(x.shape[0], -1)


class Linear:
    """dst = W src (+ b), or dst += W src for a residual, through the op of W's layout."""

    def __init__(self, step: B.Linear, model: Model, layer: int):
        self.op = model.linear(step.weight)
        self.bias = model.vector(step.bias) if step.bias is not None else None
        self.step = step
        self.ops = model.ops

    def __call__(self, bufs, pos, cos, sin) -> None:
        x = bufs[self.step.src]  # (n, in)
        if x.shape[0] == 1:
            y = self.ops.empty((1, self.op.out_features))
            self.op.gemv(x[0], y[0])
        else:
            y = self.op.gemm(x)
        if self.bias is not None:
            y += self.bias
        bufs[self.step.dst] = bufs[self.step.dst] + y if self.step.residual else y


class Attention:
    """RoPE on q and k, k and v appended to the layer's cache, causal attention over it."""

    def __init__(self, step: B.Attention, model: Model, layer: int):
        a = model.args
        self.step = step
        self.layer = layer
        self.cache = model.cache
        self.ops = model.ops
        self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim

    def __call__(self, bufs, pos, cos, sin) -> None:
        s = self.step
        n = bufs[s.q].shape[0]
        q = bufs[s.q].reshape(n, self.n_heads, self.hd)
        k = bufs[s.k].reshape(n, self.n_kv, self.hd)
        v = bufs[s.v].reshape(n, self.n_kv, self.hd)
        self.ops.rope(q, cos, sin)
        self.ops.rope(k, cos, sin)
        kc, vc = self.cache.k[self.layer], self.cache.v[self.layer]  # (max_seq, n_kv_heads, head_dim)
        kc[pos:pos + n] = k
        vc[pos:pos + n] = v
        if n == 1:
            start = 0 if s.window is None else max(0, pos + 1 - s.window)
            out = self.ops.attention_decode(q[0], kc, vc, start, pos + 1, s.scale)
        else:
            out = self.ops.attention_prefill(q, kc[:pos + n], vc[:pos + n], pos, s.window, s.scale)
        bufs[s.dst] = out.reshape(n, self.n_heads * self.hd)


class Glu:
    """gate = silu(gate) · up, in place."""

    def __init__(self, step: B.Glu, model: Model, layer: int):
        self.step = step
        self.ops = model.ops

    def __call__(self, bufs, pos, cos, sin) -> None:
        self.ops.silu_mul(bufs[self.step.gate], bufs[self.step.up])


# Which class runs which kind of step.
STEPS = {B.Norm: RMSNorm, B.HeadNorm: RMSNorm, B.Linear: Linear, B.Attention: Attention, B.Glu: Glu}


class Block:
    """One block of the description, its steps prepared for the device."""

    def __init__(self, spec: B.Block, model: Model, layer: int):
        self.spec = spec
        self.steps = [STEPS[type(step)](step, model, layer) for step in spec.steps]

    def __call__(self, bufs: dict, pos: int, cos, sin) -> None:
        for step in self.steps:
            step(bufs, pos, cos, sin)


class Transformer:
    """The whole decoder. forward(tokens, pos) -> next-token logits; keeps its own KV cache."""

    def __init__(self, reader: QbinReader, device: str = "cpu", context: int | None = None, fused: bool = True):
        args = reader.model
        self.args = args
        self.context = min(args.max_seq_len, context or args.max_seq_len)
        self.ops = device_ops(device)
        model = Model(reader, device, self.context)
        self.description = B.decoder(args)  # every layer's block, then the output block
        with self.ops.loading(reader):  # a GPU copies the weights up here, layer by layer
            self.tok_embeddings = model.linear(TOK_EMBEDDINGS.name())  # (vocab, dim)
            blocks = [Block(spec, model, i) for i, spec in enumerate(self.description)]
        self.layers, self.output = blocks[:-1], blocks[-1]
        self.cache = model.cache
        self.cos, self.sin = model.cos_dev, model.sin_dev
        # one call per decode step when the device offers it (kernels/cpu/fused.py: one compiled
        # function; kernels/cuda/decoder.py: one CUDA graph), running the same description
        self.fused = (fused_decoder(device, self.description, reader, args, self.cache, model.cos, model.sin,
                                    model.linears) if fused else None)

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
        cos, sin = self.cos[pos:pos + n], self.sin[pos:pos + n]
        bufs = {B.X: x}
        for layer in self.layers:
            layer(bufs, pos, cos, sin)
        if not all_logits:
            bufs[B.X] = bufs[B.X][-1:]
        self.output(bufs, pos, cos, sin)
        logits = self.ops.to_numpy(bufs[B.LOGITS])
        return logits if all_logits else logits[0]
