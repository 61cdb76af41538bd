"""The decoder block, described once: the steps in order, the tensors each reads, the buffers
they pass along. Every backend runs this description and nothing else: the per-operation model
(runtime/model.py), the CPU's one-call decode step (kernels/cpu/fused.py) and the CUDA decode
step (kernels/cuda/decoder.py). The calibration layer of convert/layerwise.py (torch) is checked
against it for every architecture and flag (tests/test_block.py).

A step reads and writes named buffers of one row per token: `x` is the residual stream (the
block's input and output); the others live for one block. Architecture differences are fields
of ModelArgs that choose steps or fill their fields here, never branches in a backend:

    xn = attn_norm(x);  q, k, v = wq·xn (+bq), wk·xn (+bk), wv·xn (+bv);  [q, k = q_norm(q), k_norm(k)]
    att = attention(rope(q), rope(k), v);  x += wo·att          [post_norms: x += attn_post_norm(wo·att)]
    xn = ffn_norm(x);  gate, up = w1·xn, w3·xn;  x += w2·(act(gate)·up)   [post_norms: likewise]

without pre_norms (OLMo 2) the projections read x itself; a mixture of experts (Mixtral,
Qwen3-MoE) replaces the MLP's three projections and gate by one Moe step, and a shared expert
(Qwen2-MoE) follows it as a dense MLP whose output a SigmoidGate adds; the output block is the
final norm, the head, and with final_softcap the logits' soft cap (Gemma 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import tensors as T
from .config import ModelArgs
from .rope import rope_variants

# Buffer names. X carries the residual stream from block to block; O is a sublayer's output
# on its way through a post-norm.
X, XN, Q, K, V, ATT, GATE, UP, O, LOGITS = "x", "xn", "q", "k", "v", "att", "gate", "up", "o", "logits"
ROUTER = "router"  # a mixture's router logits
# a shared expert's hidden activations (its own width) and its gate's logit
SHARED_GATE, SHARED_UP, SHARED_P = "shared_gate", "shared_up", "shared_p"


@dataclass(frozen=True)
class Norm:
    """dst = src / sqrt(mean(src²) + eps) · weight, per token (RMSNorm); with residual,
    dst += that."""

    weight: str
    src: str
    dst: str
    residual: bool = False


@dataclass(frozen=True)
class HeadNorm:
    """buf ← RMSNorm of every `width` slice of buf, times weight (width,): q/k norm per head
    (width head_dim) or over the whole projection."""

    weight: str
    buf: str
    width: int


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
    """Rotate q and k at the tokens' positions by RoPE table `rope` (an index into
    qformat.rope.rope_variants), append k and v to this layer's KV cache, then
    dst = softmax(s)·V over the cached positions with scores s = q·Kᵀ·scale, soft-capped to
    softcap·tanh(s / softcap) when softcap is set: causal, only the last `window` positions when
    it is set; query head h reads KV head h // (n_heads / n_kv_heads) (GQA)."""

    q: str
    k: str
    v: str
    dst: str
    window: int | None
    scale: float
    rope: int = 0
    softcap: float | None = None


@dataclass(frozen=True)
class Glu:
    """gate ← act(gate) · up, the gated MLP's activation: silu (SwiGLU) or the tanh
    approximation of GELU (GeGLU), config.ACTIVATIONS."""

    gate: str
    up: str
    activation: str = "silu"


@dataclass(frozen=True)
class Softcap:
    """buf ← cap · tanh(buf / cap) (Gemma 2's final logits)."""

    buf: str
    cap: float


@dataclass(frozen=True)
class SigmoidGate:
    """dst += sigmoid(gate) · src per token, gate one value per token (a shared expert's output
    under its gate, Qwen2-MoE)."""

    src: str
    gate: str
    dst: str


def expert_name(tensor: str, expert: int) -> str:
    """The op name of one expert's rows of a stacked MoE tensor (no file holds this name)."""
    return f"{tensor}#{expert}"


def parse_expert(name: str) -> tuple[str, int] | None:
    """(tensor, expert) of an expert_name, or None for a tensor's own name."""
    tensor, sep, expert = name.rpartition("#")
    return (tensor, int(expert)) if sep else None


@dataclass(frozen=True)
class Moe:
    """A mixture of experts: logits ← router·src (buffer `logits`), p = softmax(logits); for
    each token its top_k experts e (renormalized to sum 1 with norm_topk) add
    p_e · down_e·(act(gate_e·src) · up_e·src), in ascending e, into dst (dst += with residual,
    else dst = the sum). gate_e, up_e, down_e: expert e's rows of the stacked tensors
    (expert_name); gate and up buffers hold one expert's hidden activations at a time."""

    router: str
    gate: str
    up: str
    down: str
    src: str
    dst: str
    logits: str
    n_experts: int
    top_k: int
    norm_topk: bool
    activation: str
    residual: bool

    def ops(self) -> list[str]:
        """Its matrices' op names: the router, then every expert's gate, up and down rows."""
        return [self.router] + [expert_name(t, e) for t in (self.gate, self.up, self.down)
                                for e in range(self.n_experts)]


# Every kind of step, in a fixed order (a backend that encodes steps as integers uses this index).
STEP_TYPES = (Norm, HeadNorm, Linear, Attention, Glu, Softcap, Moe, SigmoidGate)
Step = Norm | HeadNorm | Linear | Attention | Glu | Softcap | Moe | SigmoidGate


@dataclass(frozen=True)
class Block:
    """The steps of one block and the per-token width of every buffer they use."""

    steps: tuple[Step, ...]
    widths: dict[str, int]

    def linears(self) -> tuple[Linear, ...]:
        return tuple(s for s in self.steps if isinstance(s, Linear))

    def ops(self) -> list[str]:
        """The op name of every matrix the block multiplies by, in step order: each Linear's
        weight, each Moe's router and experts."""
        return [n for s in self.steps for n in (s.ops() if isinstance(s, Moe) else
                                                [s.weight] if isinstance(s, Linear) else [])]

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

    src = XN if args.pre_norms else X  # what the projections after a (pre-)norm read

    def pre_norm(t: T.TensorName) -> tuple[Norm, ...]:
        return (Norm(name(t), X, XN),) if args.pre_norms else ()

    def residual(weight: T.TensorName, inp: str, post_norm: T.TensorName) -> tuple[Step, ...]:
        """x += weight·inp, through the post-norm when the model has them."""
        if not args.post_norms:
            return (Linear(name(weight), inp, X, residual=True),)
        return Linear(name(weight), inp, O), Norm(name(post_norm), O, X, residual=True)

    def mlp() -> tuple[Step, ...]:
        if not args.moe:
            return (Linear(name(T.FFN_GATE), src, GATE), Linear(name(T.FFN_UP), src, UP),
                    Glu(GATE, UP, args.activation), *residual(T.FFN_DOWN, GATE, T.FFN_POST_NORM))
        moe = Moe(name(T.FFN_ROUTER), name(T.FFN_GATE), name(T.FFN_UP), name(T.FFN_DOWN), src,
                  O if args.post_norms else X, ROUTER, args.n_experts, args.experts_per_token, args.norm_topk,
                  args.activation, residual=not args.post_norms)
        if args.post_norms:  # (ModelArgs refuses a shared expert with post-norms)
            return moe, Norm(name(T.FFN_POST_NORM), O, X, residual=True)
        return (moe, *shared_expert()) if args.shared_expert else (moe,)

    def shared_expert() -> tuple[Step, ...]:
        # its gate's logit beside gate and up: linear steps that read one buffer run together
        return (Linear(name(T.FFN_SHARED_GATE), src, SHARED_GATE), Linear(name(T.FFN_SHARED_UP), src, SHARED_UP),
                Linear(name(T.FFN_SHARED_ROUTER), src, SHARED_P), Glu(SHARED_GATE, SHARED_UP, args.activation),
                Linear(name(T.FFN_SHARED_DOWN), SHARED_GATE, O), SigmoidGate(O, SHARED_P, X))

    def projection(t: T.TensorName, dst: str) -> Linear:
        bias = T.BIAS_OF.get(t)
        return Linear(name(t), src, dst, bias=name(bias) if bias is not None and bias.present(args) else None)

    head_norms = (HeadNorm(name(T.ATTN_Q_NORM), Q, args.q_norm_dim),
                  HeadNorm(name(T.ATTN_K_NORM), K, args.k_norm_dim)) if args.qk_norm else ()
    scale = args.attn_scale if args.attn_scale is not None else 1.0 / math.sqrt(args.head_dim)
    steps = (
        *pre_norm(T.ATTN_NORM),
        projection(T.ATTN_Q, Q), projection(T.ATTN_K, K), projection(T.ATTN_V, V),
        *head_norms,
        Attention(Q, K, V, ATT, window=args.window_of(layer), scale=scale,
                  rope=rope_variants(args).index(args.rope_of(layer)), softcap=args.attn_softcap),
        *residual(T.ATTN_OUT, ATT, T.ATTN_POST_NORM),
        *pre_norm(T.FFN_NORM),
        *mlp(),
    )
    widths = {X: args.dim, XN: args.dim, Q: args.q_dim, K: args.kv_dim, V: args.kv_dim, ATT: args.q_dim,
              GATE: args.ffn_dim, UP: args.ffn_dim, O: args.dim, ROUTER: args.n_experts,
              SHARED_GATE: args.shared_ffn_dim, SHARED_UP: args.shared_ffn_dim, SHARED_P: 1}
    used = {b for s in steps for b in (getattr(s, f, None) for f in ("src", "dst", "buf", "q", "k", "v", "logits"))}
    used |= {GATE, UP}  # the MLP's hidden activations (a Moe step's, one expert at a time)
    return Block(steps, {b: w for b, w in widths.items() if b in used})


def output_block(args: ModelArgs) -> Block:
    """After the last layer: the final norm, the head's logits, their soft cap if any."""
    cap = (Softcap(LOGITS, args.final_softcap),) if args.final_softcap is not None else ()
    return Block((Norm(T.OUTPUT_NORM.name(), X, XN), Linear(T.head_name(args), XN, LOGITS), *cap),
                 {X: args.dim, XN: args.dim, LOGITS: args.vocab_size})


def decoder(args: ModelArgs) -> list[Block]:
    """The whole model after the embedding lookup: every layer's block, then the output block."""
    return [decoder_block(args, i) for i in range(args.n_layers)] + [output_block(args)]
