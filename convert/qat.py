"""Quantization-aware training: EfficientQAT (Chen et al. 2024) in its two phases.

Block-AP trains one decoder layer at a time, right after a post-training method (GPTQ, AWQ or
RTN: the init) has quantized it: the layer's weights, its group scales and zero-points, and its
norms and biases, against the float layer's outputs, with the rounding passed through by a
straight-through estimator. As in the reference implementation (OpenGVLab/EfficientQAT,
quantize/block_ap.py): the inputs are the quantized layers' outputs before it, the target is the
float model's stream through the float layer, the loss is the mean squared error, AdamW without
weight decay with a cosine schedule down to lr/20, gradient norm clipped at 0.3; scales and
zero-points learn at `lr`, the float weights at `weight_lr`. Unlike it, a few windows are held
out and the parameters of the epoch (or the init) with the least held-out error are kept, so the
training never leaves a layer worse on unseen windows than the init made it.

E2E-QP then freezes the integer codes and trains only the scales through the whole model on the
next-token loss of the calibration windows (or, `e2e_loss="kl"`, the KL divergence from the float
model's distributions, whose last-layer stream Block-AP's targets already computed), one layer
recomputed at a time in the backward pass (gradient checkpointing), so memory holds the codes and
one layer's activations.

What is trained is what is stored: the forward pass rounds the scales to the stored float16 (or
log-coded, spec §4.3) values and the zero-points to integers, so the codes and parameters
written (groupquant.to_tensor) are exactly those of the last forward pass.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qformat import tensors as T
from qformat.config import ModelArgs
from qformat.packing import unpack_codes
from qformat.schemes import KINDS, Scheme, Tensor, group_scales

from .groupquant import qmax, stored_scale, to_tensor
from .layerwise import CHUNK, LayerReport, embed, head_logits, layer_forward, rms_norm, rope_tables
from .outliers import attach

GRAD_CLIP = 0.3  # EfficientQAT's --clip_grad
MIN_LR_FACTOR = 20  # the cosine schedule ends at lr / MIN_LR_FACTOR (EfficientQAT's --min_lr_factor)
HELD_OUT = 8  # one window of every HELD_OUT is held out to choose the kept parameters


@dataclass(frozen=True)
class QatOptions:
    """Block-AP: `epochs` over `samples` calibration windows (None: all) in batches of `batch`,
    scales and zero-points at `lr`, weights, norms and biases at `weight_lr`. E2E-QP:
    `e2e_steps` steps of `e2e_batch` windows training the scales at `e2e_lr` (0 steps: no E2E)
    on `e2e_loss` (E2E_LOSSES). `seed` orders the batches."""

    epochs: int = 2
    lr: float = 3e-5
    weight_lr: float = 3e-4
    samples: int | None = None
    batch: int = 2
    e2e_steps: int = 48
    e2e_lr: float = 5e-5
    e2e_batch: int = 2
    seed: int = 0
    e2e_loss: str = "ce"

    def describe(self) -> str:
        return (f"block_ap(epochs={self.epochs}, lr={self.lr:g}, weight_lr={self.weight_lr:g}, "
                f"samples={self.samples or 'all'}, batch={self.batch}), e2e_qp(steps={self.e2e_steps}, "
                f"lr={self.e2e_lr:g}, batch={self.e2e_batch}, loss={self.e2e_loss}), seed={self.seed}")


# What E2E-QP may minimize over the calibration windows: the next-token cross-entropy (EfficientQAT's),
# or the KL divergence from the float model's next-token distributions (distillation).
E2E_LOSSES = ("ce", "kl")

# The arrays QAT trains around: the dense grid, a stored column order, 16-bit outliers and columns.
TRAINABLE_ARRAYS = frozenset({"codes", "scales", "scale_exp", "zeros", "perm", "fp_cols", "fp_weight",
                              "outlier_rowptr", "outlier_cols", "outlier_values"})


def check_trainable(t: Tensor, scheme: Scheme) -> None:
    """ValueError unless QAT can train `t`: a uniform integer grid, dense (not n:m)."""
    if KINDS[scheme.kind].nf4 or not scheme.quantized:
        raise ValueError(f"--method qat trains uniform integer grids (int2..int8); {scheme.name} is not one")
    extra = set(t.arrays) - TRAINABLE_ARRAYS
    if extra or t.sparsity is not None:
        raise ValueError(f"--method qat trains dense quantized weights; {t.name} carries {sorted(extra)} "
                         "(drop --prune)")


@dataclass
class Kept:
    """What a stored tensor keeps outside its trained grid: its column order (stored column j
    is input channel perm[j]) and its 16-bit weights (outliers, 16-bit columns), which are
    chosen before training and stay as they are: their codes stay the code of zero, so the
    dense part is zero there and the sidecar holds the weight itself (outliers.attach)."""

    perm: torch.Tensor | None  # (k,) long
    mask: torch.Tensor | None  # (rows, k) bool, input order: every weight kept in 16 bits
    values: torch.Tensor | None  # (rows, k): the kept weights there, zero elsewhere
    outliers: np.ndarray | None  # (rows, k) bool: the CSR sidecar's positions
    fp_cols: np.ndarray | None

    @classmethod
    def of(cls, t: Tensor, device) -> "Kept":
        a = t.arrays
        perm = torch.as_tensor(np.asarray(a["perm"]), device=device).long() if "perm" in a else None
        rows, k = t.shape
        outliers = fp_cols = None
        mask = np.zeros((rows, k), bool)
        if "outlier_rowptr" in a:
            ptr = np.asarray(a["outlier_rowptr"], np.int64)
            outliers = np.zeros((rows, k), bool)
            outliers[np.repeat(np.arange(rows), np.diff(ptr)), np.asarray(a["outlier_cols"], np.int64)] = True
            mask |= outliers
        if "fp_cols" in a:
            fp_cols = np.asarray(a["fp_cols"], np.int64)
            mask[:, fp_cols] = True
        if not mask.any():
            return cls(perm, None, None, None, None)
        values = torch.from_numpy(np.where(mask, t.dequantize(), 0.0).astype(np.float32)).to(device)
        return cls(perm, torch.from_numpy(mask).to(device), values, outliers, fp_cols)

    def to_stored(self, w: torch.Tensor) -> torch.Tensor:
        """Input-order columns (rows, k) in stored order."""
        return w if self.perm is None else w[:, self.perm]

    def to_input(self, w: torch.Tensor) -> torch.Tensor:
        """Stored-order columns (rows, k) in input order."""
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def weight(self, dense: torch.Tensor) -> torch.Tensor:
        """The stored weight, input order, of its dense part (stored order)."""
        w = self.to_input(dense)
        return w if self.mask is None else torch.where(self.mask, self.values, w)

    def codes(self, codes: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Stored-order codes with the kept weights' set to the code of zero (zero, (rows, k))."""
        return codes if self.mask is None else torch.where(self.to_stored(self.mask), zero, codes)

    def tensor(self, name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               scheme: Scheme) -> Tensor:
        """The stored Tensor of stored-order codes and group parameters, with the kept sidecars."""
        perm = None if self.perm is None else self.perm.cpu().numpy().astype(np.int32)
        t = to_tensor(name, codes, scales, zeros, scheme, perm)
        if self.mask is None:
            return t
        return attach(t, self.values.cpu().numpy(), self.outliers, self.fp_cols)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def tensor_params(t: Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (rows, k), scales (rows, n_groups), zero-points (rows, n_groups)) of a stored grouped
    tensor, as float32."""
    rows, k = t.shape
    bits = KINDS[t.kind].bits
    codes = unpack_codes(np.asarray(t.arrays["codes"]), k, t.group_size, bits)
    scales = group_scales(t).astype(np.float32)
    if "zeros" in t.arrays:
        zeros = np.asarray(t.arrays["zeros"], np.float32)
    else:
        zeros = np.full_like(scales, float(1 << (bits - 1)))
    return (torch.from_numpy(codes.astype(np.float32)), torch.from_numpy(np.ascontiguousarray(scales)),
            torch.from_numpy(np.ascontiguousarray(zeros)))


def per_column(p: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """(rows, n_groups) group parameters repeated over their columns: (rows, k)."""
    return p.repeat_interleave(group, dim=1)[:, :k]


class GroupFakeQuant(torch.nn.Module):
    """One projection under training: a float weight whose rounding to the group grid is the
    stored value, with trainable scales and (asymmetric grids) zero-points.

    Initialized from the init method's stored tensor so that its codes are the init's: each
    weight starts at the float checkpoint's value moved into its init code's rounding interval,
    Ŵ + clamp(W − Ŵ, ±0.49·s) (for round-to-nearest the float weight itself). Measured on
    SmolLM2 int3-g64 after GPTQ (layers 0 and 3, 64 mix windows, Block-AP's defaults): held-out
    error 0.71 / 0.73 of GPTQ's, against 0.80 / 0.78 starting at Ŵ where GPTQ moved a weight."""

    def __init__(self, w: torch.Tensor, t: Tensor, scheme: Scheme):
        super().__init__()
        check_trainable(t, scheme)
        self.scheme = scheme
        self.rows, self.k = t.shape
        self.group = t.group_size
        self.top = float(qmax(scheme))
        self.kept = Kept.of(t, w.device)
        codes, scales, zeros = (p.to(w.device) for p in tensor_params(t, scheme))
        s, z = per_column(scales, self.group, self.k), per_column(zeros, self.group, self.k)
        w_hat = (codes - z) * s
        w = self.kept.to_stored(w.float())  # trained in stored column order, where the groups are
        self.weight = torch.nn.Parameter(w_hat + torch.clamp(w - w_hat, -0.49 * s, 0.49 * s))
        self.scale = torch.nn.Parameter(scales)
        self.asymmetric = "zeros" in t.arrays
        if self.asymmetric:
            self.zero = torch.nn.Parameter(zeros)
        else:
            self.register_buffer("zero", zeros)

    def group_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zero-points) (rows, n_groups) as stored, with straight-through gradients."""
        s = self.scale.clamp(min=2.0**-24)
        s = s + (stored_scale(s.detach(), self.scheme) - s).detach()
        z = torch.clamp(round_ste(self.zero), 0.0, self.top) if self.asymmetric else self.zero
        return s, z

    def forward(self) -> torch.Tensor:
        """The dequantized weight (rows, k), input order, of the current codes and parameters."""
        s, z = self.group_params()
        s, z = per_column(s, self.group, self.k), per_column(z, self.group, self.k)
        codes = self.kept.codes(torch.clamp(round_ste(self.weight / s) + z, 0.0, self.top), z)
        return self.kept.weight((codes - z) * s)

    @torch.no_grad()
    def stored(self, name: str) -> tuple[Tensor, torch.Tensor]:
        """(the Tensor of the current codes and parameters, its dequantized weight)."""
        s, z = self.group_params()
        sc, zc = per_column(s, self.group, self.k), per_column(z, self.group, self.k)
        codes = self.kept.codes(torch.clamp(torch.round(self.weight / sc) + zc, 0.0, self.top), zc)
        return self.kept.tensor(name, codes, s, z, self.scheme), self.kept.weight((codes - zc) * sc)


# ---------------------------------------------------------------------------- Block-AP

def _cosine(step: int, total: int) -> float:
    """The learning-rate factor of `step` of `total`: 1 -> 1/MIN_LR_FACTOR on a half cosine."""
    low = 1.0 / MIN_LR_FACTOR
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _split(n: int) -> tuple[list[int], list[int]]:
    """Training and held-out window indices: every HELD_OUT-th window held out (none below 2)."""
    held = list(range(HELD_OUT - 1, n, HELD_OUT)) if n >= 2 else []
    if n >= 2 and not held:
        held = [n - 1]
    train = [i for i in range(n) if i not in set(held)]
    return train, held or train


def block_ap(x: torch.Tensor, target: torch.Tensor, w: dict[str, torch.Tensor], refs: dict[str, torch.Tensor],
             stored: dict[str, Tensor], schemes: dict[str, Scheme], args: ModelArgs, rope, layer: int,
             opts: QatOptions) -> tuple[dict[str, Tensor], float, float]:
    """Train decoder layer `layer` on inputs x (B, T, dim) toward the float outputs `target`.

    w: the layer's tensors as the init left them (Ŵ for the projections; updated in place to
    the trained Ŵ, norms and biases); refs: the float weights the projections approximate;
    stored: the init's Tensors of the projections. Returns the trained Tensors and the held-out
    mean squared error before and after."""
    gen = torch.Generator().manual_seed(opts.seed * 100_003 + layer)
    quant = {n: GroupFakeQuant(refs[n], stored[n], schemes[n]) for n in stored}
    floats = {n: torch.nn.Parameter(v.detach().clone()) for n, v in w.items()
              if n not in quant and v.is_floating_point() and n != T.FFN_ROUTER.key}
    n = x.shape[0] if opts.samples is None else min(opts.samples, x.shape[0])
    train, held = _split(n)

    def forward(idx: list[int]) -> torch.Tensor:
        wd = dict(w)
        wd.update(floats)
        wd.update({name: m() for name, m in quant.items()})
        return layer_forward(x[idx], wd, args, rope, layer)

    def held_out() -> float:
        with torch.no_grad():
            parts = [held[i:i + CHUNK] for i in range(0, len(held), CHUNK)]
            return float(sum(F.mse_loss(forward(p), target[p], reduction="sum") for p in parts)
                         / (len(held) * target[0].numel()))

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    q_params = [p for m in quant.values() for p in (m.scale, m.zero) if p.requires_grad]
    w_params = [m.weight for m in quant.values()] + list(floats.values())
    params = q_params + w_params
    before = best = held_out()
    best_state = snapshot()
    steps_per_epoch = -(-len(train) // opts.batch)
    total = opts.epochs * steps_per_epoch
    if total and params:
        groups = [g for g in ({"params": q_params, "lr": opts.lr}, {"params": w_params, "lr": opts.weight_lr})
                  if g["params"] and g["lr"] > 0]
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        base = [g["lr"] for g in opt.param_groups]
        step = 0
        with torch.enable_grad():
            for _ in range(opts.epochs):
                order = torch.randperm(len(train), generator=gen).tolist()
                for b in range(0, len(order), opts.batch):
                    idx = [train[i] for i in order[b:b + opts.batch]]
                    loss = F.mse_loss(forward(idx), target[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                    opt.step()
                    step += 1
                    for g, lr in zip(opt.param_groups, base):
                        g["lr"] = lr * _cosine(step, total)
                err = held_out()
                if err < best:
                    best, best_state = err, snapshot()
    with torch.no_grad():
        for p, v in zip(params, best_state):
            p.copy_(v)
    out = {}
    for name, m in quant.items():
        out[name], w_hat = m.stored(name)
        w[name] = w_hat
    for name, p in floats.items():
        w[name] = p.detach()
    return out, before, best


@dataclass
class QatMethod:
    """QAT as a layerwise.LayerMethod: the init method quantizes the layer's stages, then
    `refine` trains the whole layer (Block-AP); `finish` runs E2E-QP over the finished stream."""

    init: object  # the init's layerwise.LayerMethod
    options: QatOptions
    name: str = "qat"
    # the float model's stream after the last layer refined so far: after the last layer, the
    # teacher of E2E-QP's KL loss (calibration windows x seqlen x dim, float32)
    float_out: torch.Tensor | None = field(default=None, repr=False)

    @property
    def folds(self) -> bool:
        return self.init.folds

    def fold_scales(self, names, stats, w, into, schemes) -> None:
        self.init.fold_scales(names, stats, w, into, schemes)

    def quantize(self, names, stats, w, schemes) -> dict[str, Tensor]:
        return self.init.quantize(names, stats, w, schemes)

    def refine(self, x, target, w, refs, stored, schemes, args, rope, report: LayerReport) -> dict[str, Tensor]:
        """Block-AP of one quantized layer (see block_ap); the held-out errors go to the report."""
        self.float_out = target
        if not stored:
            return stored
        out, before, after = block_ap(x, target, w, refs, stored, schemes, args, rope, report.index, self.options)
        report.note = f"block-ap mse {before:.3e} -> {after:.3e}"
        return out

    def finish(self, items: Iterator, args: ModelArgs, tokens: np.ndarray, device, progress: bool) -> Iterator:
        """The stream with E2E-QP's scales in its projections (the stream itself without steps)."""
        if self.options.e2e_steps <= 0:
            yield from items
            return
        items = list(items)  # the float stream is complete once every layer has been refined
        teacher = self.float_out if self.options.e2e_loss == "kl" else None
        self.float_out = None
        yield from e2e_qp(items, args, tokens, self.options, device, progress, teacher)


# ---------------------------------------------------------------------------- E2E-QP

@dataclass
class FrozenGrid:
    """A projection under E2E-QP: frozen codes (stored order), zero-points and kept weights, a
    trainable scale."""

    codes: torch.Tensor  # (rows, k) float32
    zero: torch.Tensor  # (rows, n_groups)
    scale: torch.nn.Parameter  # (rows, n_groups)
    scheme: Scheme
    group: int
    kept: Kept

    def weight(self) -> torch.Tensor:
        s = self.scale.clamp(min=2.0**-24)
        s = s + (stored_scale(s.detach(), self.scheme) - s).detach()
        k = self.codes.shape[1]
        return self.kept.weight((self.codes - per_column(self.zero, self.group, k)) * per_column(s, self.group, k))

    def tensor(self, name: str) -> Tensor:
        with torch.no_grad():
            s = stored_scale(self.scale.clamp(min=2.0**-24), self.scheme)
            return self.kept.tensor(name, self.codes, s, self.zero, self.scheme)


def e2e_qp(items: list, args: ModelArgs, tokens: np.ndarray, opts: QatOptions, device, progress: bool,
           teacher: torch.Tensor | None = None) -> list:
    """Train the scales of every quantized decoder projection in `items` ((planned, Tensor,
    stats) in plan order) on the calibration windows `tokens`; the embeddings, head and norms
    are those stored. The loss: the next-token cross-entropy, or with `teacher` (the float
    model's final stream over `tokens`, (samples, seqlen, dim)) the KL divergence from the
    teacher's next-token distributions under the stored final norm and head (which E2E-QP does
    not train, so the student can match them exactly). Returns the items with the trained
    tensors, or as they were when the held-out loss did not improve."""
    by_name = {p.name: t for p, t, _ in items}
    emb = torch.from_numpy(by_name[T.TOK_EMBEDDINGS.name()].dequantize()).to(device)
    head = torch.from_numpy(by_name[T.head_name(args)].dequantize()).to(device)
    norm = torch.from_numpy(by_name[T.OUTPUT_NORM.name()].dequantize()).to(device)
    layers: list[dict[str, torch.Tensor | FrozenGrid]] = [{} for _ in range(args.n_layers)]
    frozen: dict[str, FrozenGrid] = {}
    for p, t, _ in items:
        name, layer = T.parse_name(p.name)
        if layer is None:
            continue
        if p.role == "linear" and p.scheme.quantized:
            check_trainable(t, p.scheme)
            codes, scales, zeros = tensor_params(t, p.scheme)
            f = FrozenGrid(codes.to(device), zeros.to(device), torch.nn.Parameter(scales.to(device)), p.scheme,
                        t.group_size, Kept.of(t, device))
            frozen[p.name] = layers[layer][name.key] = f
        else:
            layers[layer][name.key] = torch.from_numpy(t.dequantize()).to(device)
    rope = rope_tables(args, tokens.shape[1], device)
    toks = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=device)
    train, held = _split(toks.shape[0])

    def run_layer(i: int, x: torch.Tensor) -> torch.Tensor:
        w = {k: (v.weight() if isinstance(v, FrozenGrid) else v) for k, v in layers[i].items()}
        return layer_forward(x, w, args, rope, i)

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        return head_logits(rms_norm(x, norm, args.norm_eps), head, args)

    def loss_of(idx: list[int], grad: bool) -> torch.Tensor:
        x = embed(emb, toks[idx], args)
        for i in range(args.n_layers):
            x = checkpoint(run_layer, i, x, use_reentrant=False) if grad else run_layer(i, x)
        logits = logits_of(x)
        if teacher is None:
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), toks[idx][:, 1:].flatten())
        with torch.no_grad():
            target = torch.log_softmax(logits_of(teacher[idx].to(device)).flatten(0, 1), -1)
        return F.kl_div(torch.log_softmax(logits.flatten(0, 1), -1), target, log_target=True, reduction="batchmean")

    def held_out() -> float:
        with torch.no_grad():
            return float(np.mean([float(loss_of(held[i:i + 1], False)) for i in range(len(held))]))

    params = [f.scale for f in frozen.values()]
    before = held_out()
    gen = torch.Generator().manual_seed(opts.seed)
    opt = torch.optim.AdamW(params, lr=opts.e2e_lr, weight_decay=0.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=opts.e2e_steps, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False,
                   desc="e2e-qp")
    with torch.enable_grad():
        for step in range(opts.e2e_steps):
            pick = torch.randint(len(train), (opts.e2e_batch,), generator=gen).tolist()
            loss = loss_of([train[i] for i in pick], True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            for g in opt.param_groups:
                g["lr"] = opts.e2e_lr * _cosine(step + 1, opts.e2e_steps)
            if bar is not None:
                bar.set_postfix_str(f"loss {float(loss):.4f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    after = held_out()
    what = "loss" if teacher is None else "KL"
    print(f"e2e-qp: held-out {what} {before:.4f} -> {after:.4f} over {len(held)} windows"
          + ("" if after < before else " (kept the Block-AP scales)"), file=sys.stderr)
    if not after < before:  # the items still hold Block-AP's scales
        return items
    out = []
    for p, t, stats in items:
        f = frozen.get(p.name)
        out.append((p, t if f is None else f.tensor(p.name), stats))
    return out


__all__ = ["E2E_LOSSES", "FrozenGrid", "GroupFakeQuant", "Kept", "QatMethod", "QatOptions", "block_ap",
           "check_trainable", "e2e_qp", "round_ste", "tensor_params"]
