"""How much each tensor's quantization error costs the model: the measurement pass of `--target-bpw`.

One forward and one backward pass of the float model over calibration text, a layer at a time,
gives for every projection W (out, k) of the decoder, the head and the embedding:
  H = Σ_t x_t x_tᵀ   the Gram matrix of its inputs (what GPTQ minimizes under), and
  F_j = Σ_t g_tj²    the second moment of the loss gradient at each of its outputs j.
A change ΔW moves output j by Δy_tj = ΔW_j x_t, and the loss to second order (empirical Fisher,
outputs' gradients independent of their errors) by

  ΔL ≈ ½ Σ_j E[g_j²] E[Δy_j²] = ½ Σ_j (F_j / N) (ΔW_j H ΔW_jᵀ / N)   nats per token (N tokens),

the layer-output error under the calibration Hessian weighted by how much the loss cares about
each output. That makes the errors of different layers and tensors comparable, which the bare
layer-output error is not (`score="output"` keeps it, as relative error, for comparison). For the
embedding lookup the same rule holds per looked-up row: ½ Σ_v Σ_d G_vd ΔE_vd² / N with G_vd
the squared gradients of the tokens v at the layer stack's input; a tied embedding pays both.

Memory: one layer's float32 weights, the calibration activations of every layer's input (kept
for the backward pass: samples x seqlen x dim per layer), and the statistics (k x k per input,
vocab x dim for the embedding). The loss is the next-token cross entropy of the calibration
text itself (the gradient of a KL to the unquantized model vanishes at the unquantized model).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from qformat import tensors as T
from qformat.config import ModelArgs

from .layerwise import CHUNK, best_device, embed, head_logits, layer_forward, rms_norm, rope_tables

SCORES = ("fisher", "output")


@dataclass
class TensorStats:
    """One weight's statistics: its inputs' Gram matrix H (k, k), its outputs' squared gradients
    F (out,), both summed over n_tokens; lookup (vocab, dim): the embedding's per-row squared
    gradients (None for projections)."""

    gram: torch.Tensor
    out_sq_grad: torch.Tensor
    n_tokens: int
    lookup: torch.Tensor | None = None


@dataclass
class Sensitivity:
    """TensorStats by qbin tensor name (the head's under the embedding's name when tied), and the
    measurement's loss on its own text."""

    stats: dict[str, TensorStats] = field(default_factory=dict)
    loss: float = 0.0
    n_tokens: int = 0

    def predicted_loss(self, name: str, w: torch.Tensor, w_hat: torch.Tensor, score: str = "fisher") -> float:
        """ΔL of replacing weight w by w_hat (module docstring); score "output": the relative
        layer-output error ‖ΔW H‖/‖W H‖ instead (plus the relative lookup error of an embedding)."""
        st = self.stats[name]
        dev = (st.gram if st.gram is not None else st.lookup).device
        err = (w_hat.to(dev, torch.float32) - w.to(dev, torch.float32))
        total = 0.0
        if st.gram is not None:
            per_row = ((err @ st.gram) * err).sum(1, dtype=torch.float64)
            if score == "fisher":
                total += 0.5 * float((per_row * st.out_sq_grad.double()).sum()) / st.n_tokens ** 2
            else:
                w32 = w.to(dev, torch.float32)
                total += float(per_row.sum()) / max(float(((w32 @ st.gram) * w32).sum(dtype=torch.float64)), 1e-30)
        if st.lookup is not None:
            sq = err.double() ** 2
            if score == "fisher":
                total += 0.5 * float((sq * st.lookup.double()).sum()) / st.n_tokens
            else:
                seen = st.lookup.double()
                total += float((sq * seen).sum()) / max(float((w.to(dev).double() ** 2 * seen).sum()), 1e-30)
        return total


def spread(tokens: np.ndarray, count: int) -> np.ndarray:
    """`count` windows of the calibration matrix, evenly spaced over it: every source of a "mix"
    (pydoc first, then self-sampled text) is measured, not just the first."""
    if count >= len(tokens):
        return tokens
    return tokens[np.linspace(0, len(tokens) - 1, count).round().astype(np.int64)]


def measure(ckpt, args: ModelArgs, planned: list, tokens: np.ndarray, *, device: torch.device | None = None,
            progress: bool = True) -> Sensitivity:
    """The statistics of every planned 2-D weight (projections, embedding, head) over `tokens`
    (samples, seqlen), by one forward and one backward pass of the float model, layer by layer."""
    device = device or best_device()
    names = {p.name: p for p in planned}
    tok = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    n_seq, seqlen = tok.shape
    n_tokens = n_seq * seqlen
    rope = rope_tables(args, seqlen, device)
    emb_name = T.TOK_EMBEDDINGS.name()
    emb = torch.from_numpy(ckpt.read(names[emb_name].hf_name)).to(device)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * args.n_layers + 1, unit="pass", file=sys.stderr, dynamic_ncols=True, leave=False,
                   desc="sensitivity")

    def layer_weights(i: int) -> dict[str, torch.Tensor]:
        return {T.parse_name(p.name)[0].key: torch.from_numpy(ckpt.read(p.hf_name)).to(device)
                for p in planned if T.parse_name(p.name)[1] == i}

    # forward: keep every layer's input (float32 when it fits in 2 GiB, else bfloat16)
    store_dtype = torch.float32 if 4 * n_tokens * args.dim * (args.n_layers + 1) <= 2 << 30 else torch.bfloat16
    inputs = []
    with torch.no_grad():
        x = embed(emb, tok.to(device), args)
        for i in range(args.n_layers):
            inputs.append(x.to(store_dtype))
            w = layer_weights(i)
            x = torch.cat([layer_forward(x[c:c + CHUNK], w, args, rope, i) for c in range(0, n_seq, CHUNK)])
            if bar is not None:
                bar.update(1)
    out = Sensitivity(n_tokens=n_tokens)
    # the head: cross entropy of the next token, its gradient at the logits is softmax - onehot
    norm_w = torch.from_numpy(ckpt.read(names[T.OUTPUT_NORM.name()].hf_name)).to(device)
    head_name = T.OUTPUT.name() if T.OUTPUT.name() in names else emb_name
    head_w = torch.from_numpy(ckpt.read(names[head_name].hf_name)).to(device) if head_name != emb_name else emb
    k = args.dim
    h_gram = torch.zeros(k, k, device=device)
    f_head = torch.zeros(head_w.shape[0], device=device, dtype=torch.float64)
    grad_x = torch.empty_like(x)
    loss_sum = 0.0
    targets = torch.roll(tok, -1, dims=1).to(device)
    for c in range(0, n_seq):
        xc = x[c:c + 1].detach().requires_grad_(True)
        hn = rms_norm(xc, norm_w, args.norm_eps)
        logits = head_logits(hn, head_w, args)
        logits.retain_grad()
        # the last position has no next token in its window: it carries no loss
        loss = F.cross_entropy(logits[0, :-1], targets[c, :-1], reduction="sum")
        loss.backward()
        loss_sum += float(loss.detach())
        flat = hn.detach().reshape(-1, k)
        h_gram.addmm_(flat.T, flat)
        f_head += (logits.grad[0] ** 2).sum(0, dtype=torch.float64)
        grad_x[c:c + 1] = xc.grad
    out.loss = loss_sum / (n_seq * (seqlen - 1))
    out.stats[head_name] = TensorStats(h_gram, f_head.to(torch.float32), n_tokens)
    if bar is not None:
        bar.update(1)
    # backward, layer by layer from the top: each layer's projections' statistics, and the
    # gradient at its input for the layer below
    for i in reversed(range(args.n_layers)):
        w = layer_weights(i)
        grams: dict[str, torch.Tensor] = {}
        sq: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for c in range(0, n_seq, CHUNK):
            xc = inputs[i][c:c + CHUNK].to(torch.float32).requires_grad_(True)
            taps: dict = {}
            y = layer_forward(xc, w, args, rope, i, taps)
            y.backward(grad_x[c:c + CHUNK])
            with torch.no_grad():
                shared: dict[int, str] = {}
                for key, (xin, yout) in taps.items():
                    if id(xin) in shared:  # q/k/v and gate/up read one input: one Gram matrix
                        seen[key] = shared[id(xin)]
                    else:
                        shared[id(xin)] = key
                        flat = xin.detach().reshape(-1, xin.shape[-1])
                        grams[key] = grams.get(key, 0) + flat.T @ flat
                    g = yout.grad.reshape(-1, yout.shape[-1])
                    sq[key] = sq.get(key, 0) + (g.double() ** 2).sum(0)
                grad_x[c:c + CHUNK] = xc.grad
            del taps, y, xc
        for key in sq:
            out.stats[f"layers.{i}.{key}"] = TensorStats(grams[seen.get(key, key)], sq[key].to(torch.float32), n_tokens)
        inputs[i] = None
        if bar is not None:
            bar.update(1)
    # the embedding lookup: squared gradients at the stack's input, summed per token id
    lookup = torch.zeros(emb.shape, device=device, dtype=torch.float32)
    row_grad = grad_x if args.embed_scale is None else grad_x * args.embed_scale  # d x / d row = embed_scale
    lookup.index_add_(0, tok.reshape(-1).to(device), row_grad.reshape(-1, k) ** 2)
    if head_name == emb_name:
        out.stats[emb_name].lookup = lookup
    else:
        out.stats[emb_name] = TensorStats(None, None, n_tokens, lookup)
    if bar is not None:
        bar.close()
    return out
