"""GPTQ (Frantar et al. 2022): quantize a linear layer column by column, compensating each
column's rounding error on the columns not yet quantized, weighted by the inverse Hessian of
the layer-output error H = 2·XᵀX (X: the layer's calibration inputs, one row per token).

Facts from the reference implementation (IST-DASLab/gptq, `fasterquant`) followed here:
dead inputs (H[i,i] = 0) get H[i,i] = 1 and a zero weight column; dampening adds
`damp`·mean(diag H) to the diagonal; U = upper Cholesky factor of H⁻¹; per column i:
q = quant(w_i), e = (w_i − q)/U[i,i], W[:, i+1:] −= e ⊗ U[i, i+1:], applied lazily in blocks;
with act-order columns are visited by decreasing H[i,i].
Differences: a group's scale and zero-point are computed from the *updated* columns of that
group when its first column is reached (blocks are aligned to groups so all of them are
current), optionally with a clipping-ratio search; with act-order the groups are formed in the
permuted order, which is exactly what the format's `perm` sidecar stores (spec/qbin.md §6.1).
The codes chosen here are stored as they are (groupquant.to_tensor), never re-quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qformat.schemes import Scheme, Tensor

from .groupquant import CLIP_GRID, codes_of, dequant, group_params, one_thread, to_tensor
from .outliers import KeepOptions, attach, fp_columns, outlier_count, select_kept

# Measured on SmolLM2-135M, GPTQ int4-g64, the same 64 x 512 mix calibration tokens (README):
# damp 0.01 ppl 15.34 pydoc / 24.49 prose, 0.03 15.21 / 24.09, 0.1 15.46 / 24.21.
DEFAULT_DAMP = 0.03
DEFAULT_BLOCK = 128


@dataclass
class GptqResult:
    """Codes and group parameters in stored column order, the permutation, and Ŵ (input order)."""

    codes: torch.Tensor  # (rows, k) float32 integer codes, stored order
    scales: torch.Tensor  # (rows, n_groups) float16-exact float32
    zeros: torch.Tensor  # (rows, n_groups)
    perm: np.ndarray | None  # stored column j is input channel perm[j]; None without act-order
    w_hat: torch.Tensor  # (rows, k) dequantized weight in input-channel order
    kept: torch.Tensor | None = None  # (rows, k) bool, input order: weights kept in 16 bits (outliers.py)
    fp_cols: np.ndarray | None = None  # input channels kept whole in 16 bits

    def tensor(self, name: str, scheme: Scheme, rows: slice | None = None) -> Tensor:
        """The stored Tensor (optionally for a slice of rows, e.g. wq out of a fused q/k/v run)."""
        rows = rows or slice(None)
        t = to_tensor(name, self.codes[rows], self.scales[rows], self.zeros[rows], scheme, self.perm)
        if self.kept is None:
            return t
        return attach(t, self.w_hat[rows].cpu().numpy(), self.kept[rows].cpu().numpy(), self.fp_cols)


def _group_start(w: torch.Tensor, hdiag: torch.Tensor, scheme: Scheme, clip_search: bool):
    """Scale and zero of one group (rows, G); with clip_search the ratio minimizing the
    diag(H)-weighted squared error of the group, per row."""
    if not clip_search:
        return group_params(w, scheme)
    best_s, best_z = group_params(w, scheme)
    best = (((dequant(codes_of(w, best_s, best_z, scheme), best_s, best_z, scheme) - w) ** 2) * hdiag).sum(1)
    for r in CLIP_GRID[1:]:
        s, z = group_params(w, scheme, r)
        err = (((dequant(codes_of(w, s, z, scheme), s, z, scheme) - w) ** 2) * hdiag).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better[:, None], s, best_s)
        best_z = torch.where(better[:, None], z, best_z)
    return best_s, best_z


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, *, damp: float = DEFAULT_DAMP,
                  block: int = DEFAULT_BLOCK, act_order: bool = False, clip_search: bool = False,
                  prune=None, outliers: int = 0, fp_cols: np.ndarray | None = None,
                  static_groups: bool = False) -> GptqResult:
    """GPTQ of the weight w (rows, k) given the input Gram matrix h (k, k) = XᵀX (any positive
    multiple works: dampening is relative to its mean diagonal).

    static_groups: every group's scale and zero-point are fixed up front from the unquantized
    weights of its input-order columns (AutoGPTQ's static_groups, llm-compressor's
    actorder="weight"); with act-order the columns are still visited by decreasing H[i,i], but
    the groups stay contiguous in input order, so no permutation is stored.
    prune: a prune.SweepMask, for SparseGPT (convert/prune.py); then a float scheme only prunes."""
    w = w.detach().to(torch.float32).clone()
    rows, k = w.shape
    if prune is None and not scheme.quantized:
        raise ValueError(f"GPTQ needs a quantized scheme, got {scheme.name}")
    if prune is not None and act_order:
        raise ValueError("pruning visits columns in input order; act-order does not combine with it")
    g = scheme.group_for(k) if scheme.quantized else block
    h = h.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = None
    if static_groups and scheme.quantized:
        if prune is not None or outliers or fp_cols is not None:
            raise ValueError("static groups do not combine with pruning, outliers or 16-bit columns")
        hd = torch.diagonal(h).to(torch.float32)
        params = [_group_start(w[:, a:a + g], hd[a:a + g], scheme, clip_search) for a in range(0, k, g)]
        static = (torch.cat([p[0] for p in params], 1), torch.cat([p[1] for p in params], 1))
    perm = None
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
        perm = order.cpu().numpy().astype(np.int32)
    h += damp * torch.mean(torch.diagonal(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    hdiag = torch.diagonal(h).to(torch.float32)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    # `outliers` weights (SpQR's criterion) and the input channels `fp_cols` stay in 16 bits (outliers.py)
    kept = select_kept(w, hinv, scheme, outliers, fp_cols, perm) if outliers or fp_cols is not None else None
    # Blocks hold whole groups, so a group's parameters are computed from fully updated columns.
    block = max(block // g, 1) * g if g <= block else g
    n_groups = -(-k // g)
    scales = torch.zeros(rows, n_groups, device=w.device)
    zeros = torch.zeros(rows, n_groups, device=w.device)
    # Work on Wᵀ (k, rows): a column of W is then a contiguous row, and the rank-1 updates of the
    # block are in-place outer products on contiguous memory.
    wt = w.T.contiguous()
    codes_t = torch.zeros_like(wt)
    q_t = torch.zeros_like(wt)
    group_of = None
    if static is not None:  # the loop reads each column's input-order group
        scales, zeros = static
        group_of = (torch.as_tensor(perm).long() if perm is not None else torch.arange(k)) // g
    with one_thread():
        _column_loop(wt, hinv, hdiag, scheme, g, block, clip_search, codes_t, q_t, scales, zeros, prune,
                     None if kept is None else kept.T.contiguous(), group_of)
    codes, q_all = codes_t.T, q_t.T.contiguous()
    w_hat = q_all
    if static is not None and perm is not None:  # stored in input order: no permutation
        order = torch.as_tensor(perm, device=w.device).long()
        codes, w_hat = torch.empty_like(codes), torch.empty_like(q_all)
        codes[:, order], w_hat[:, order] = codes_t.T, q_all
        return GptqResult(codes, scales, zeros, None, w_hat)
    if perm is not None:
        w_hat = torch.empty_like(q_all)
        w_hat[:, torch.as_tensor(perm, device=w.device).long()] = q_all
        if kept is not None:
            unpermuted = torch.empty_like(kept)
            unpermuted[:, torch.as_tensor(perm, device=w.device).long()] = kept
            kept = unpermuted
    return GptqResult(codes, scales, zeros, perm, w_hat, kept, fp_cols)


def _column_loop(wt, hinv, hdiag, scheme, g, block, clip_search, codes_t, q_t, scales, zeros, prune=None, kept_t=None,
                 group_of=None) -> None:
    """The GPTQ sweep over the columns of W (rows of wt, updated in place), lazily in blocks.
    With `group_of` (static groups) column i takes the fixed scales[:, group_of[i]] instead.
    With `prune` (SparseGPT) the weights prune.keep marks False become exactly zero when their
    column is reached and their error is compensated like rounding error; group parameters are
    found on the kept weights only (zeroed pruned ones leave min/max/absmax unchanged)."""
    k = wt.shape[0]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[i1:i2]  # a view: updated in place
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        s = z = None
        for i in range(i2 - i1):
            col = i1 + i
            if prune is not None and i % prune.span(i2 - i1) == 0:
                span = prune.span(i2 - i1)
                prune.choose(w1[i:i + span], torch.diagonal(hinv1)[i:i + span], col)
            if group_of is not None:
                s, z = scales[:, group_of[col]], zeros[:, group_of[col]]
            elif scheme.quantized and col % g == 0:
                part = w1[i:i + g] if prune is None else w1[i:i + g] * prune.keep[col:col + g]
                if kept_t is not None:  # weights kept in 16 bits stay out of the group's range
                    part = torch.where(kept_t[col:col + g], 0.0, part)
                s, z = _group_start(part.T, hdiag[col:col + g], scheme, clip_search)
                scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
                s, z = s[:, 0], z[:, 0]
            wc = w1[i]
            if not scheme.quantized:
                q = wc * prune.keep[col]
            else:
                c = codes_of(wc, s, z, scheme)
                q = dequant(c, s, z, scheme)
                if prune is not None:  # a pruned weight is stored as the code of 0: exactly zero
                    kept = prune.keep[col]
                    q = q * kept
                    c = torch.where(kept, c, codes_of(torch.zeros_like(wc), s, z, scheme))
                if kept_t is not None:  # kept exactly (SpQR): the code of zero here, the float16
                    m = kept_t[col]      # value in the sidecar, so no error to propagate
                    c = torch.where(m, codes_of(torch.zeros_like(wc), s, z, scheme), c)
                    q = torch.where(m, wc.half().float(), q)
                codes_t[col] = c
            q_t[col] = q
            e = (wc - q).div_(hinv1[i, i])
            err1[i] = e
            if i + 1 < i2 - i1:
                w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1.0)
        if i2 < k:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1.0)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    """(‖X(W − Ŵ)ᵀ‖², ‖XWᵀ‖²) from the Gram matrix h = XᵀX, without the inputs themselves."""
    e = (w - w_hat).to(torch.float64)
    h = h.to(torch.float64)
    w = w.to(torch.float64)
    return float(((e @ h) * e).sum()), float(((w @ h) * w).sum())


@dataclass
class GptqMethod:
    """GPTQ as a layerwise.LayerMethod: projections sharing their inputs (q/k/v, gate/up) share
    one Hessian and are quantized in one run over their stacked rows (rows are independent)."""

    damp: float = DEFAULT_DAMP
    block: int = DEFAULT_BLOCK
    act_order: bool = False
    clip_search: bool = False
    keep: KeepOptions = KeepOptions()  # outliers / 16-bit columns (outliers.py)
    static_groups: bool = False  # groups fixed in input order: act-order without a stored perm
    name: str = "gptq"
    folds: bool = False

    def fold_scales(self, names, stats, w, into, schemes) -> None:
        """GPTQ folds nothing."""

    def quantize(self, names: list[str], stats, w: dict[str, torch.Tensor], schemes: dict[str, Scheme]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        by_scheme: dict[Scheme, list[str]] = {}
        for n in names:
            by_scheme.setdefault(schemes[n], []).append(n)
        for scheme, group in by_scheme.items():
            stacked = torch.cat([w[n] for n in group], dim=0)
            cols = fp_columns(stats.abs_max, self.keep.threshold)
            res = gptq_quantize(stacked, stats.gram, scheme, damp=self.damp, block=self.block,
                                act_order=self.act_order, clip_search=self.clip_search,
                                outliers=outlier_count(stacked.numel(), self.keep.fraction),
                                fp_cols=cols if cols.size else None, static_groups=self.static_groups)
            start = 0
            for n in group:
                rows = slice(start, start + w[n].shape[0])
                out[n] = res.tensor(n, scheme, rows)
                w[n] = res.w_hat[rows].clone()
                start = rows.stop
        return out
