"""The decoder block, described once: the steps in order, the tensors each reads, the buffers
they pass along. Every backend runs this description and nothing else: the per-operation model
(runtime/model.py), the CPU's one-call decode step (kernels/cpu/fused.py) and the CUDA decode
step (kernels/cuda/decoder.py). The calibration layer of convert/layerwise.py (torch) is checked
against it for every architecture and flag (tests/test_block.py).

A step reads and writes named buffers of one row per token: `x` is the residual stream (the
block's input and output); the others live for one block. Architecture differences are fields
of ModelArgs that choose steps or fill their fields here, never branches in a backend:

    xn = attn_norm(x);  q, k, v = wq·xn (+bq), wk·xn (+bk), wv·xn (+bv);  [q, k = q_norm(q), k_norm(k)]
    att = attention(rope(q), rope(k), v);  x += wo·att
    xn = ffn_norm(x);  gate, up = w1·xn, w3·xn;  x += w2·(silu(gate)·up)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import tensors as T
from .config import ModelArgs

# Buffer names. X carries the residual stream from block to block.
X, XN, Q, K, V, ATT, GATE, UP, LOGITS = "x", "xn", "q", "k", "v", "att", "gate", "up", "logits"


@dataclass(frozen=True)
class Norm:
    """dst = src / sqrt(mean(src²) + eps) · weight, per token (RMSNorm)."""

    weight: str
    src: str
    dst: str


@dataclass(frozen=True)
class HeadNorm:
    """buf ← RMSNorm of every head_dim slice of buf, times weight (head_dim,): q/k norm."""

    weight: str
    buf: str


@dataclass(frozen=True)
class Linear:
    """dst = weight · src (+ bias); with residual, dst += weight · src."""

    weight: str
    src: str
    dst: str
    bias: str | None = None
    residual: bool = False


@dataclass(frozen=True)
class Attention:
    """Rotate q and k at the tokens' positions (RoPE, the model's table), append k and v to this
    layer's KV cache, then dst = softmax(q·Kᵀ·scale)·V over the cached positions: causal, only
    the last `window` positions when it is set; query head h reads KV head h // (n_heads /
    n_kv_heads) (GQA)."""

    q: str
    k: str
    v: str
    dst: str
    window: int | None
    scale: float


@dataclass(frozen=True)
class Glu:
    """gate ← silu(gate) · up (the gated MLP's activation)."""

    gate: str
    up: str


# Every kind of step, in a fixed order (a backend that encodes steps as integers uses this index).
STEP_TYPES = (Norm, HeadNorm, Linear, Attention, Glu)
Step = Norm | HeadNorm | Linear | Attention | Glu


@dataclass(frozen=True)
class Block:
    """The steps of one block and the per-token width of every buffer they use."""

    steps: tuple[Step, ...]
    widths: dict[str, int]

    def linears(self) -> tuple[Linear, ...]:
        return tuple(s for s in self.steps if isinstance(s, Linear))

    def tensors(self) -> list[str]:
        """Every tensor the block reads, in step order."""
        out = []
        for s in self.steps:
            out += [n for n in (getattr(s, "weight", None), getattr(s, "bias", None)) if n is not None]
        return out


def decoder_block(args: ModelArgs, layer: int) -> Block:
    """Decoder layer `layer` of a model of `args`."""
    def name(t: T.TensorName) -> str:
        return t.name(layer)

    def projection(t: T.TensorName, dst: str) -> Linear:
        bias = T.BIAS_OF.get(t)
        return Linear(name(t), XN, dst, bias=name(bias) if bias is not None and bias.present(args) else None)

    head_norms = (HeadNorm(name(T.ATTN_Q_NORM), Q), HeadNorm(name(T.ATTN_K_NORM), K)) if args.qk_norm else ()
    steps = (
        Norm(name(T.ATTN_NORM), X, XN),
        projection(T.ATTN_Q, Q), projection(T.ATTN_K, K), projection(T.ATTN_V, V),
        *head_norms,
        Attention(Q, K, V, ATT, window=args.sliding_window, scale=1.0 / math.sqrt(args.head_dim)),
        Linear(name(T.ATTN_OUT), ATT, X, residual=True),
        Norm(name(T.FFN_NORM), X, XN),
        Linear(name(T.FFN_GATE), XN, GATE), Linear(name(T.FFN_UP), XN, UP),
        Glu(GATE, UP),
        Linear(name(T.FFN_DOWN), GATE, X, residual=True),
    )
    widths = {X: args.dim, XN: args.dim, Q: args.q_dim, K: args.kv_dim, V: args.kv_dim, ATT: args.q_dim,
              GATE: args.ffn_dim, UP: args.ffn_dim}
    return Block(steps, widths)


def output_block(args: ModelArgs) -> Block:
    """After the last layer: the final norm, then the head's logits."""
    return Block((Norm(T.OUTPUT_NORM.name(), X, XN), Linear(T.head_name(args), XN, LOGITS)),
                 {X: args.dim, XN: args.dim, LOGITS: args.vocab_size})


def decoder(args: ModelArgs) -> list[Block]:
    """The whole model after the embedding lookup: every layer's block, then the output block."""
    return [decoder_block(args, i) for i in range(args.n_layers)] + [output_block(args)]
