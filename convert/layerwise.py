"""Layer-by-layer calibrated quantization with bounded memory.

The calibration tokens are embedded once; then, one decoder layer at a time, the layer is built
from the checkpoint's tensors (float32, on CUDA when available), its projections are quantized
stage by stage in the order the data flows through them (q/k/v, o, gate/up, down), each stage
seeing the outputs of the already *quantized* projections before it, and the quantized layer's
outputs become the next layer's inputs. Only one layer's weights and the calibration batch's
activations are ever in memory, never the whole float32 model.

What a method does with a stage's inputs is the LayerMethod's business (gptq.py, awq.py): it
may fold per-channel scales into the preceding norm or projection (AWQ), then quantizes.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from qformat import tensors as T
from qformat.config import ROPE_LOCAL, ROPE_NONE, ModelArgs
from qformat.rope import rope_variants
from qformat.schemes import Scheme, Tensor

# A layer's tensors by the part of their name after "layers.{i}." (qformat.tensors): w's keys.
(ATTN_NORM, WQ, WK, WV, WO, BQ, BK, BV, Q_NORM, K_NORM, ATTN_POST_NORM, FFN_NORM, ROUTER, W1, W3, W2,
 FFN_POST_NORM) = (
    t.key for t in (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_Q_BIAS, T.ATTN_K_BIAS,
                    T.ATTN_V_BIAS, T.ATTN_Q_NORM, T.ATTN_K_NORM, T.ATTN_POST_NORM, T.FFN_NORM, T.FFN_ROUTER,
                    T.FFN_GATE, T.FFN_UP, T.FFN_DOWN, T.FFN_POST_NORM))
SW1, SW3, SW2, SHARED_ROUTER = (t.key for t in (T.FFN_SHARED_GATE, T.FFN_SHARED_UP, T.FFN_SHARED_DOWN,
                                                 T.FFN_SHARED_ROUTER))
QKV, GATE_UP = [WQ, WK, WV], [W1, W3]  # the projections that read one input
# Sequences per forward chunk: bounds the attention scores' memory (heads x T x T per sequence).
CHUNK = 8
# Chunks of the batch used to search down_proj's scales (on float gate/up outputs, an extra pass).
FOLD_CHUNKS = 4
# An expert routed fewer calibration tokens than this is calibrated on all the layer's tokens: its
# own few would make a near-singular Gram matrix, and every expert reads the same normed stream.
MIN_EXPERT_TOKENS = 32


# ---------------------------------------------------------------------------- the decoder layer

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(args: ModelArgs, seqlen: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """cos, sin (seqlen, head_dim) of HF's rotate-half RoPE for each of qformat.rope.rope_variants:
    the model's (linear, llama3 or longrope scaling), the sliding layers' local one, none
    (identity)."""
    return [_rope_table(args, seqlen, device, v) for v in rope_variants(args)]


def _rope_table(args: ModelArgs, seqlen: int, device, variant: int) -> tuple[torch.Tensor, torch.Tensor]:
    hd = args.rope_dim  # (seqlen, rope_dim): a partial rotary's tables cover its dims only
    if variant == ROPE_NONE:
        return torch.ones(seqlen, hd, device=device), torch.zeros(seqlen, hd, device=device)
    local = variant == ROPE_LOCAL
    theta = args.rope_local_theta if local else args.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = None if local else args.rope_scaling
    if sc is not None and sc.kind == "linear":
        inv = inv / sc.factor
    elif sc is not None and sc.kind == "llama3":
        low_wl = sc.original_max_position / sc.low_freq_factor
        high_wl = sc.original_max_position / sc.high_freq_factor
        wl = 2 * math.pi / inv
        smooth = (sc.original_max_position / wl - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        scaled = torch.where(wl > low_wl, inv / sc.factor, inv)
        mid = (wl <= low_wl) & (wl >= high_wl)
        inv = torch.where(mid, (1 - smooth) * inv / sc.factor + smooth * inv, scaled)
    elif sc is not None and sc.kind == "longrope":  # the factors the runtime's default context uses
        long = args.max_seq_len > sc.original_max_position
        inv = inv / torch.tensor(sc.long_factor if long else sc.short_factor, dtype=torch.float64)
    freqs = torch.outer(torch.arange(seqlen, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    gain = sc.attention_factor if sc is not None and sc.kind == "longrope" else 1.0
    return (emb.cos() * gain).to(torch.float32).to(device), (emb.sin() * gain).to(torch.float32).to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of the first cos.shape[-1] dims of x (all, or a partial rotary's)."""
    rot = cos.shape[-1]
    x, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return torch.cat([x * cos + rotated * sin, rest], dim=-1)


def project(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T for a projection's weight tensor; a module (qtune's frozen quantized base with its
    adapter, tune/) applies itself."""
    return w(x) if isinstance(w, torch.nn.Module) else x @ w.T


def tap(taps: dict | None, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y, the output of projection `name` on input x; recorded in `taps` (when given) as
    (x, y) with y's gradient retained (sensitivity.py reads both after a backward pass)."""
    if taps is not None:
        y.retain_grad()
        taps[name] = (x, y)
    return y


def attention(xn: torch.Tensor, w: dict[str, torch.Tensor], args: ModelArgs, rope, layer: int,
              taps: dict | None = None) -> torch.Tensor:
    """Causal GQA self-attention of decoder layer `layer` on its inputs xn (B, T, dim) (normed,
    with pre-norms) -> o_proj's input (B, T, H*hd); rope: rope_tables'; taps: see `tap`."""
    b, t, _ = xn.shape
    hd = args.head_dim

    def proj(name: str, bias: str, norm: str, heads: int) -> torch.Tensor:
        y = tap(taps, name, xn, project(xn, w[name]))
        if bias in w:
            y = y + w[bias]
        if norm in w and not args.qk_norm_per_head:  # OLMo 2: over the whole projection
            y = rms_norm(y, w[norm], args.norm_eps)
        y = y.view(b, t, heads, hd).transpose(1, 2)  # (B, heads, T, hd)
        return rms_norm(y, w[norm], args.norm_eps) if norm in w and args.qk_norm_per_head else y

    q = proj(WQ, BQ, Q_NORM, args.n_heads)
    k = proj(WK, BK, K_NORM, args.n_kv_heads)
    v = proj(WV, BV, "", args.n_kv_heads)
    cos, sin = rope[rope_variants(args).index(args.rope_of(layer))]
    q, k = _rotate(q, cos[:t], sin[:t]), _rotate(k, cos[:t], sin[:t])
    rep = args.n_heads // args.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    i = torch.arange(t, device=xn.device)
    allowed = i[None, :] <= i[:, None]
    window = args.window_of(layer)
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    scale = args.attn_scale if args.attn_scale is not None else hd ** -0.5
    if args.attn_softcap is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    else:  # Gemma 2: scores soft-capped before the mask and softmax
        s = (q @ k.transpose(-1, -2)) * scale
        s = args.attn_softcap * torch.tanh(s / args.attn_softcap)
        o = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    return o.transpose(1, 2).reshape(b, t, args.n_heads * hd)


# The gated MLP's activation of each config.ACTIVATIONS entry.
ACTIVATION = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def ffn_act(xn: torch.Tensor, w: dict[str, torch.Tensor], args: ModelArgs, taps: dict | None = None) -> torch.Tensor:
    """Gated hidden activations (SwiGLU or GeGLU): down_proj's input."""
    return ACTIVATION[args.activation](tap(taps, W1, xn, project(xn, w[W1]))) * tap(taps, W3, xn, project(xn, w[W3]))


def moe_ffn(xn: torch.Tensor, w: dict[str, torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """A mixture of experts' output for its inputs xn (B, T, dim), as transformers computes it:
    softmax routing, the top experts (renormalized with norm_topk), expert e's rows of the
    stacked w1/w3/w2, the outputs added in ascending expert order; plus a shared expert's output
    under its sigmoid gate when the model has one."""
    b, t, d = xn.shape
    x = xn.reshape(-1, d)
    probs = torch.softmax((x @ w[ROUTER].T).float(), dim=-1)
    top, chosen = torch.topk(probs, args.experts_per_token, dim=-1)
    if args.norm_topk:
        top = top / top.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    f = args.ffn_dim
    for e in range(args.n_experts):
        tok, slot = torch.where(chosen == e)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = ACTIVATION[args.activation](xe @ w[W1][e * f:(e + 1) * f].T) * (xe @ w[W3][e * f:(e + 1) * f].T)
        out.index_add_(0, tok, (h @ w[W2][e * d:(e + 1) * d].T) * top[tok, slot, None])
    if args.shared_expert:
        out = out + torch.sigmoid(x @ w[SHARED_ROUTER].T) * (shared_act(x, w, args) @ w[SW2].T)
    return out.reshape(b, t, d)


def shared_act(x: torch.Tensor, w: dict[str, torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """A shared expert's gated hidden activations: its down projection's input."""
    return ACTIVATION[args.activation](x @ w[SW1].T) * (x @ w[SW3].T)


def pre_norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, args: ModelArgs) -> torch.Tensor:
    """A sublayer's input: the residual stream normed by `name`, or itself without pre-norms."""
    return rms_norm(x, w[name], args.norm_eps) if args.pre_norms else x


def residual_add(x: torch.Tensor, y: torch.Tensor, w: dict[str, torch.Tensor], post: str, args: ModelArgs
                 ) -> torch.Tensor:
    """x + y, through the sublayer's post-norm `post` when the model has them."""
    return x + (rms_norm(y, w[post], args.norm_eps) if args.post_norms else y)


def layer_forward(x: torch.Tensor, w: dict[str, torch.Tensor], args: ModelArgs, rope, layer: int,
                  taps: dict | None = None) -> torch.Tensor:
    """Decoder layer `layer`: h = x + attn(norm1(x)); out = h + ffn(norm2(h)) (pre- and
    post-norms as the model has them); taps: see `tap`."""
    o_in = attention(pre_norm(x, w, ATTN_NORM, args), w, args, rope, layer, taps)
    h = residual_add(x, tap(taps, WO, o_in, project(o_in, w[WO])), w, ATTN_POST_NORM, args)
    if args.moe:
        return residual_add(h, moe_ffn(pre_norm(h, w, FFN_NORM, args), w, args), w, FFN_POST_NORM, args)
    act = ffn_act(pre_norm(h, w, FFN_NORM, args), w, args, taps)
    return residual_add(h, tap(taps, W2, act, project(act, w[W2])), w, FFN_POST_NORM, args)


def embed(emb: torch.Tensor, tokens, args: ModelArgs) -> torch.Tensor:
    """The residual stream's first rows: embedding rows of `tokens`, times embed_scale (Gemma)."""
    x = emb[torch.as_tensor(tokens, dtype=torch.long, device=emb.device)]
    return x if args.embed_scale is None else x * torch.tensor(args.embed_scale, dtype=x.dtype)


def head_logits(hn: torch.Tensor, head: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The logits of the final normed states, soft-capped with final_softcap (Gemma 2)."""
    logits = project(hn, head)
    return logits if args.final_softcap is None else args.final_softcap * torch.tanh(logits / args.final_softcap)


# ---------------------------------------------------------------------------- statistics

@dataclass
class InputStats:
    """What a method may know about a stage's inputs X (tokens, k): the Gram matrix XᵀX and the
    mean absolute value per channel, accumulated over the calibration batch."""

    gram: torch.Tensor  # (k, k) float32
    abs_mean: torch.Tensor  # (k,)
    n_tokens: int
    abs_max: torch.Tensor | None = None  # (k,) largest |x_j| over all tokens (LLM.int8() columns)


def input_stats(chunks: list[torch.Tensor]) -> InputStats:
    k = chunks[0].shape[-1]
    dev = chunks[0].device
    gram = torch.zeros(k, k, device=dev)
    abs_sum = torch.zeros(k, device=dev, dtype=torch.float64)
    abs_max = torch.zeros(k, device=dev)
    n = 0
    for c in chunks:
        x = c.reshape(-1, k)
        gram.addmm_(x.T, x)
        abs_sum += x.abs().sum(0, dtype=torch.float64)
        abs_max = torch.maximum(abs_max, x.abs().amax(0))
        n += x.shape[0]
    return InputStats(gram, (abs_sum / max(n, 1)).to(torch.float32), n, abs_max)


@dataclass
class LinearReport:
    """Relative output error ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² of one quantized projection on its calibration inputs."""

    name: str
    rel_err: float


@dataclass
class LayerReport:
    index: int
    linears: list[LinearReport] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""  # what a method's refine step reports (qat.py: Block-AP's held-out error)

    def line(self) -> str:
        parts = ", ".join(f"{r.name.split('.')[-1]} {r.rel_err:.2e}" for r in self.linears)
        note = f"; {self.note}" if self.note else ""
        return f"layer {self.index:3d}: {parts}{note} ({self.seconds:.1f} s)"


class LayerMethod(Protocol):
    """A calibrated method: optional scale folding, then quantization of a stage's projections."""

    name: str
    folds: bool  # whether fold_scales does anything (saves a pass over the inputs when not)

    def fold_scales(self, names: list[str], stats: InputStats, w: dict[str, torch.Tensor], into: str,
                    schemes: dict[str, Scheme]) -> None:
        """Fold per-input-channel scales into `w[names]` and the op `into` (in place) or do nothing."""

    def quantize(self, names: list[str], stats: InputStats, w: dict[str, torch.Tensor],
                 schemes: dict[str, Scheme]) -> dict[str, Tensor]:
        """Stored tensors of `names`; replaces w[name] by its dequantized value (in place)."""

    # A method may also define refine(x, target, w, refs, stored, schemes, args, rope, report)
    # -> stored: called after the layer's stages are quantized, with the layer's inputs x and
    # the float model's outputs of this layer (qat.py's Block-AP), returning the stored tensors
    # and updating w in place.


# ---------------------------------------------------------------------------- the runner

def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rel_err(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    e = (w - w_hat).double()
    g = gram.double()
    den = float(((w.double() @ g) * w.double()).sum())
    return float(((e @ g) * e).sum()) / den if den > 0 else 0.0


def _chunks(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    return [fn(x[i:i + CHUNK]) for i in range(0, x.shape[0], CHUNK)]


def quantize_layer(x: torch.Tensor, w: dict[str, torch.Tensor], args: ModelArgs, rope, method: LayerMethod,
                   schemes: dict[str, Scheme], report: LayerReport
                   ) -> tuple[torch.Tensor, dict[str, Tensor], dict[str, torch.Tensor]]:
    """Quantize one layer's projections stage by stage.

    Returns the quantized layer's outputs for x (B, T, dim), the stored tensors, and the float
    weights they approximate (after any folding). `w` is updated in place (folded norms, Ŵ).
    """
    eps = args.norm_eps
    out: dict[str, Tensor] = {}
    refs: dict[str, torch.Tensor] = {}

    def fold(names: list[str], make_inputs: Callable[[], list[torch.Tensor]], into: str) -> None:
        names = [n for n in names if n in schemes]  # skipped projections stay in float
        if names and method.folds:
            method.fold_scales(names, input_stats(make_inputs()), w, into, schemes)

    def quant(names: list[str], inputs: list[torch.Tensor]) -> None:
        names = [n for n in names if n in schemes]
        if not names:
            return
        stats = input_stats(inputs)
        refs.update({n: w[n].clone() for n in names})
        out.update(method.quantize(names, stats, w, schemes))
        report.linears.extend(LinearReport(n, _rel_err(refs[n], w[n], stats.gram)) for n in names)

    # W8A8 (smoothquant.py): a method's quantize_inputs returns a stage's inputs as the runtime
    # will see them (int8-rounded), called before quantize (a static scale is fixed there); later
    # stages and the next layer are computed from those
    seen = getattr(method, "quantize_inputs", None)

    def runtime_inputs(names: list[str], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        names = [n for n in names if n in schemes]
        return seen(names, inputs) if seen is not None and names else inputs

    layer = report.index
    # q, k, v read the normed residual stream: their scales fold into attn_norm (without
    # pre-norms, OLMo 2, there is nothing to fold them into)
    if args.pre_norms:
        fold(QKV, lambda: _chunks(x, lambda c: rms_norm(c, w[ATTN_NORM], eps)), ATTN_NORM)
    xn = _chunks(x, lambda c: pre_norm(c, w, ATTN_NORM, args))
    # o's scales fold into v's rows only for methods that ask (SmoothQuant, GQA-aware, before v
    # is quantized); AWQ does not scale o (under GQA one v row feeds several o columns).
    if getattr(method, "folds_v_o", False):
        fold([WO], lambda: [attention(c, w, args, rope, layer) for c in xn], WV)
    xq = runtime_inputs(QKV, xn)
    quant(QKV, xn)
    # o reads the attention output of the quantized q/k/v.
    o_in = [attention(c, w, args, rope, layer) for c in xq]
    del xn, xq
    oq = runtime_inputs([WO], o_in)
    quant([WO], o_in)
    h = torch.cat([residual_add(xc, oc @ w[WO].T, w, ATTN_POST_NORM, args) for xc, oc in zip(x.split(CHUNK), oq)])
    del o_in, oq
    if args.moe:
        return moe_stage(h, w, args, method, schemes, report, out, refs), out, refs
    # gate/up read the normed residual after attention: their scales fold into ffn_norm.
    if args.pre_norms:
        fold(GATE_UP, lambda: _chunks(h, lambda c: rms_norm(c, w[FFN_NORM], eps)), FFN_NORM)
    hn = _chunks(h, lambda c: pre_norm(c, w, FFN_NORM, args))
    # down's scales fold into up's rows (the gated product is linear in up); they are searched on
    # the float gate/up outputs, before those projections are quantized.
    fold([W2], lambda: [ffn_act(c, w, args) for c in hn[:FOLD_CHUNKS]], W3)
    hq = runtime_inputs(GATE_UP, hn)
    quant(GATE_UP, hn)
    act = [ffn_act(c, w, args) for c in hq]
    del hn, hq
    aq = runtime_inputs([W2], act)
    quant([W2], act)
    y = torch.cat([residual_add(hc, ac @ w[W2].T, w, FFN_POST_NORM, args) for hc, ac in zip(h.split(CHUNK), aq)])
    return y, out, refs


def moe_stage(h: torch.Tensor, w: dict[str, torch.Tensor], args: ModelArgs, method: LayerMethod,
              schemes: dict[str, Scheme], report: LayerReport, out: dict, refs: dict) -> torch.Tensor:
    """A mixture's experts quantized one by one, each on the calibration tokens the float
    router sends it (all the layer's, below MIN_EXPERT_TOKENS): gate/up on its inputs, then down
    on its quantized gate/up's activations; a method that folds (AWQ) folds down's scales into
    up's rows of that expert only (the norm before is every expert's: nothing folds into it). The
    stored experts are stacked into one tensor per projection (out, refs); returns the layer's
    outputs through the quantized experts."""
    hn = _chunks(h, lambda c: pre_norm(c, w, FFN_NORM, args))
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in hn])
    chosen = torch.topk(torch.softmax((x @ w[ROUTER].T).float(), dim=-1), args.experts_per_token, dim=-1).indices
    act_fn = ACTIVATION[args.activation]
    names = [n for n in (W1, W3, W2) if n in schemes]
    parts: dict[str, list] = {n: [] for n in names}
    part_refs: dict[str, list] = {n: [] for n in names}
    errs: dict[str, list] = {n: [] for n in names}
    rows = {W1: args.ffn_dim, W3: args.ffn_dim, W2: args.dim}
    for e in range(args.n_experts):
        tok = torch.nonzero((chosen == e).any(dim=-1)).flatten()
        xe = x[tok] if tok.numel() >= MIN_EXPERT_TOKENS else x
        we = {n: w[n][e * rows[n]:(e + 1) * rows[n]].clone() for n in (W1, W3, W2)}
        se = {n: schemes[n] for n in names}
        if method.folds and W2 in se:
            method.fold_scales([W2], input_stats([act_fn(xe @ we[W1].T) * (xe @ we[W3].T)]), we, W3, se)
        for stage, inputs in (([n for n in (W1, W3) if n in se], lambda: xe),
                              ([W2] if W2 in se else [], lambda: act_fn(xe @ we[W1].T) * (xe @ we[W3].T))):
            if not stage:
                continue
            stats = input_stats([inputs()])
            before = {n: we[n].clone() for n in stage}
            stored = method.quantize(stage, stats, we, se)
            for n in stage:
                parts[n].append(stored[n])
                part_refs[n].append(before[n])
                errs[n].append(_rel_err(before[n], we[n], stats.gram))
        for n in (W1, W3, W2):
            w[n][e * rows[n]:(e + 1) * rows[n]] = we[n]
    for n in names:
        out[n] = Tensor.stack_rows(n, parts[n])
        refs[n] = torch.cat(part_refs[n])
        report.linears.append(LinearReport(n, float(np.mean(errs[n]))))
    if args.shared_expert:
        shared_stage(x, w, args, method, schemes, report, out, refs)
    return torch.cat([residual_add(hc, moe_ffn(pre_norm(hc, w, FFN_NORM, args), w, args), w, FFN_POST_NORM, args)
                      for hc in h.split(CHUNK)])


def shared_stage(x: torch.Tensor, w: dict[str, torch.Tensor], args: ModelArgs, method: LayerMethod,
                 schemes: dict[str, Scheme], report: LayerReport, out: dict, refs: dict) -> None:
    """A shared expert quantized as a dense MLP on all the layer's tokens x (N, dim): a method
    that folds (AWQ) folds down's scales into the shared up's rows (the norm before also feeds
    the router and the experts), then gate/up on x, then down on their quantized activations."""
    if method.folds and SW2 in schemes:
        method.fold_scales([SW2], input_stats([shared_act(x, w, args)]), w, SW3, schemes)
    for stage, inputs in (([SW1, SW3], lambda: x), ([SW2], lambda: shared_act(x, w, args))):
        stage = [n for n in stage if n in schemes]
        if not stage:
            continue
        stats = input_stats([inputs()])
        refs.update({n: w[n].clone() for n in stage})
        out.update(method.quantize(stage, stats, w, schemes))
        report.linears.extend(LinearReport(n, _rel_err(refs[n], w[n], stats.gram)) for n in stage)


def calibrated_stream(ckpt, args: ModelArgs, planned: list, tokens: np.ndarray, method: LayerMethod,
                      store: Callable, *, progress: bool = True, device: torch.device | None = None,
                      reports: list[LayerReport] | None = None) -> Iterator[tuple[object, Tensor, object]]:
    """Yield (planned tensor, stored Tensor, QuantStats or None) in plan order, quantizing the
    decoder layers' projections with `method` on the calibration `tokens` (samples, seqlen).

    Tensors outside the layers (embeddings, final norm, head) go through `store(name, w, scheme)`;
    so do projections planned in a float scheme (skipped), which still feed the layer in float.
    """
    from .rtn import QuantStats

    device = device or best_device()
    by_layer: dict[int, list] = {}
    for p in planned:
        _, layer = T.parse_name(p.name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(p)
    rope = rope_tables(args, tokens.shape[1], device)
    refine = getattr(method, "refine", None)
    x = x_float = None  # the quantized model's stream, and the float model's (for refine)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=args.n_layers, unit="layer", file=sys.stderr, dynamic_ncols=True, leave=False,
                   desc=f"{method.name}")
    with torch.no_grad():
        for p in planned:
            _, layer = T.parse_name(p.name)
            if layer is None:
                w = ckpt.read(p.hf_name)
                if p.role == "embed" and x is None:
                    x = x_float = embed(torch.from_numpy(w), tokens, args).to(device)  # (B, T, dim)
                t, stats = store(p.name, w, p.scheme)
                yield p, t, stats
                continue
            if p is not by_layer[layer][0]:
                continue
            if x is None:  # the embeddings are planned first; a plan without them is a bug
                raise RuntimeError("the plan lists a decoder layer before the token embeddings")
            started = time.perf_counter()
            items = by_layer[layer]
            fp = {T.parse_name(q.name)[0].key: torch.from_numpy(ckpt.read(q.hf_name)).to(device) for q in items}
            # a method may choose its projections (pruning also takes float ones); by default the quantized
            handles = getattr(method, "handles", lambda q: q.scheme.quantized)
            schemes = {T.parse_name(q.name)[0].key: q.scheme for q in items if q.role == "linear" and handles(q)}
            rep = LayerReport(layer)
            x_in, target = x, None
            if refine is not None:
                x_float = target = torch.cat(_chunks(x_float, lambda c: layer_forward(c, fp, args, rope, layer)))
            x, stored, refs = quantize_layer(x, fp, args, rope, method, schemes, rep)
            if refine is not None:
                stored = refine(x_in, target, fp, refs, stored, schemes, args, rope, rep)
                x = torch.cat(_chunks(x_in, lambda c: layer_forward(c, fp, args, rope, layer)))
            del x_in
            rep.seconds = time.perf_counter() - started
            if reports is not None:
                reports.append(rep)
            if bar is not None:
                bar.set_postfix_str(f"layer {layer} rel err {np.mean([r.rel_err for r in rep.linears] or [0]):.2e}")
                bar.update(1)
            for q in items:
                short = T.parse_name(q.name)[0].key
                if short in stored:
                    t = dataclasses.replace(stored[short], name=q.name)
                    ref = refs[short].cpu().numpy()
                    yield q, t, weight_stats(t, ref, q.scheme, QuantStats)
                else:  # norms, biases (possibly folded), skipped projections
                    t, stats = store(q.name, fp[short].cpu().numpy(), q.scheme)
                    yield q, t, stats
            del fp, refs, stored
    if bar is not None:
        bar.close()


def weight_stats(t: Tensor, w: np.ndarray, scheme: Scheme, cls):
    """Weight-space errors of a stored tensor: plain min/max RTN's and the stored one's.
    For AWQ, w is the scaled weight the tensor approximates (its folded partner absorbs 1/s)."""
    from .rtn import plain_error, sum_sq

    err = t.dequantize() - w
    if not scheme.quantized:  # a pruned float projection: no rounding to compare with
        return cls(w.size, sum_sq(w), sum_sq(err), sum_sq(err))
    return cls(w.size, sum_sq(w), float(plain_error(w, scheme).sum(dtype=np.float64)), sum_sq(err))
