"""Pruning of the decoder projections: n:m structured (2:4, 4:8) or an unstructured fraction.

Three ways to choose the pruned weights, in increasing cost and quality:
- magnitude: keep the largest |W| (per block of m columns for n:m, per output row for a fraction);
  needs no calibration.
- wanda (Sun et al. 2023, locuslab/wanda): score |W_ij|·‖X_j‖₂, X_j input channel j over the
  calibration tokens, compared within the same groups; the kept weights are not changed.
- sparsegpt (Frantar & Alistarh 2023, IST-DASLab/sparsegpt `fasterprune`): the GPTQ column sweep
  (convert/gptq.py, shared, not copied) with the layer Hessian H = XᵀX + damp; when a column is
  reached its pruned weights become exactly zero and their error is spread over the columns not
  yet visited, as GPTQ spreads rounding error. The mask is chosen from the *updated* weights by
  w²/U[j,j]² (U the upper Cholesky factor of H⁻¹), lowest pruned: per block of m columns for
  n:m, at the start of every lazy block (128 columns) for a fraction.

Differences from the references, and why:
- A fraction is pruned per output row (SparseGPT picks the lowest scores of a whole column block
  over all rows): every row then has the same count of weights, the pattern the tests check and
  a row-parallel kernel would want. The per-block counts are spread so the row total is exact.
- Joint pruning and quantization (SparseGPT with --method gptq): the reference quantizes with
  one per-row scale found on the unpruned weights before the sweep; here a group's scale and
  zero are found when its first column is reached, on its kept, already updated weights (as
  GPTQ does), so the remaining weights compensate both pruning and rounding. For that the n:m
  mask of a whole group of G columns is chosen when the group starts (G is a multiple of m).
- Masks chosen by magnitude or Wanda can also be quantized by GPTQ (--method gptq): the same
  sweep with the mask held fixed, so the compensation never revives a pruned weight.

Storage: n:m in a quantized scheme uses the spec's compressed form (§6.3: the n kept codes of
every m columns plus their positions). A float scheme (f16/bf16) stores the pruned weight
densely with exact zeros. An unstructured fraction is stored densely too (zeros are exact in
every scheme: 0 is code z): see `UNSTRUCTURED_STORAGE` for why no bitmask.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import torch

from qformat.schemes import Scheme, Tensor, float_tensor

from .gptq import DEFAULT_BLOCK, DEFAULT_DAMP, gptq_quantize
from .groupquant import to_nm_tensor, to_tensor
from .rtn import QuantStats, search_clip

NM_PATTERNS = ((2, 4), (4, 8))  # the n:m forms spec/qbin.md §6.3 stores

UNSTRUCTURED_STORAGE = """\
An unstructured fraction is stored densely, with exact zeros, and no bitmask. At 50% a bitmask
(1 bit per weight) plus the kept codes would take, per weight, int4-g64: 1 + 2 + 0.19 (a scale
and zero per 64 kept values) = 3.19 bits against 4.375 dense (27% less); f16: 9 bits against 16.
But 2:4 gives the same 50% with a 2-bit position per kept value (int4-g64: 2 + 1 + 0.375 = 3.375
bits per weight, 6% more than the bitmask), and a kernel can use it: each kept value has a fixed
slot, so a GEMV streams codes and positions in lockstep. A bitmask row has data-dependent
offsets (a popcount prefix per word) and gathers activations at random positions; at 50% density
CPU and GPU kernels for that are slower than the dense kernel (unstructured sparsity starts to
pay near 70-90%). The bitmask would save 6% over 2:4 on disk and nothing at run time: not worth
a second sparse layout in the format."""


@dataclass(frozen=True)
class Pattern:
    """A pruning pattern: n:m (keep n of every m consecutive input columns) or a fraction."""

    text: str
    n: int = 0  # kept per block; 0 for an unstructured fraction
    m: int = 0
    fraction: float = 0.5  # pruned fraction of every row

    @property
    def structured(self) -> bool:
        return self.m > 0

    def pruned_count(self, cols: int) -> int:
        """Weights a row of `cols` columns loses (unstructured), rounded to nearest."""
        return int(round(self.fraction * cols))


def parse_pattern(text: str) -> Pattern:
    """"2:4" or "4:8" (structured) or "50%" (any percentage in (0, 100), unstructured)."""
    s = text.strip()
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, mm = int(m[1]), int(m[2])
        if (n, mm) not in NM_PATTERNS:
            raise ValueError(f"prune pattern {text!r}: the format stores 2:4 and 4:8 (or use a percentage such as 50%)")
        return Pattern(s, n, mm, 1.0 - n / mm)
    m = re.fullmatch(r"(\d+(?:\.\d*)?)%", s)
    if m and 0 < float(m[1]) < 100:
        return Pattern(s, fraction=float(m[1]) / 100)
    raise ValueError(f"prune pattern {text!r}; expected 2:4, 4:8 or a percentage such as 50%")


def check_layer(pattern: Pattern, name: str, shape: tuple[int, ...], scheme: Scheme) -> None:
    """ValueError with one line when `pattern` cannot be stored for a (rows, k) weight."""
    if not pattern.structured:
        return
    k = shape[1]
    if k % pattern.m:
        raise ValueError(f"{name}: {pattern.text} sparsity needs in_features divisible by {pattern.m}, got {k}")
    if scheme.quantized and scheme.group_for(k) % pattern.m:
        raise ValueError(f"{scheme.name}: {pattern.text} sparsity needs a group size divisible by {pattern.m}")


# ---------------------------------------------------------------------------- masks

def keep_top(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep mask (rows, k) of the highest scores: n of every m columns, or all but the
    pattern's fraction of every row. Ties keep the earlier column (stable sort)."""
    rows, k = score.shape
    keep = torch.zeros(rows, k, dtype=torch.bool, device=score.device)
    if pattern.structured:
        blocks = score.reshape(rows, k // pattern.m, pattern.m)
        order = torch.argsort(blocks, dim=2, descending=True, stable=True)[:, :, :pattern.n]
        keep.view(rows, k // pattern.m, pattern.m).scatter_(2, order, True)
        return keep
    order = torch.argsort(score, dim=1, descending=True, stable=True)[:, :k - pattern.pruned_count(k)]
    return keep.scatter_(1, order, True)


def magnitude_mask(w: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the largest |W|."""
    return keep_top(w.abs(), pattern)


def wanda_mask(w: torch.Tensor, gram: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the largest |W_ij|·‖X_j‖₂; ‖X_j‖₂² is the diagonal of the Gram matrix XᵀX."""
    return keep_top(w.abs() * torch.diagonal(gram).clamp(min=0).sqrt()[None, :], pattern)


# How each --prune-method chooses its mask before any weight is changed: mask(w, gram, pattern);
# None: the mask is chosen inside the SparseGPT sweep, from the weights as they are updated.
MASKS = {
    "magnitude": lambda w, gram, pattern: magnitude_mask(w, pattern),
    "wanda": wanda_mask,
    "sparsegpt": None,
}
PRUNE_METHODS = tuple(MASKS)


class SweepMask:
    """Which weights the GPTQ column sweep prunes (the `prune` hook of gptq._column_loop).

    `keep` (k, rows) is filled as the sweep goes: `choose` is called at the first column of every
    span and decides that span from the current weights wt (span, rows) and d (span,), the
    diagonal of the inverse Hessian's Cholesky factor there. With `fixed` (rows, k) the mask is
    given (magnitude or Wanda masks quantized by GPTQ) and only copied.
    """

    def __init__(self, pattern: Pattern, k: int, rows: int, every: int | None,
                 fixed: torch.Tensor | None = None, device=None):
        self.pattern = pattern
        self.every = every  # span length; None: the whole lazy block
        self.keep = torch.ones(k, rows, dtype=torch.bool, device=device)
        self.fixed = None if fixed is None else fixed.T.contiguous()

    def span(self, block_len: int) -> int:
        return self.every or block_len

    def choose(self, wt: torch.Tensor, d: torch.Tensor, col: int) -> None:
        span = wt.shape[0]
        if self.fixed is not None:
            self.keep[col:col + span] = self.fixed[col:col + span]
            return
        score = (wt * wt) / (d * d)[:, None]  # (span, rows): the OBS error of pruning each weight
        if self.pattern.structured:
            self.keep[col:col + span] = keep_top(score.T.contiguous(), self.pattern).T
            return
        # a row's pruned count in this span, so that the counts over all spans add up exactly
        drop = self.pattern.pruned_count(col + span) - self.pattern.pruned_count(col)
        order = torch.argsort(score, dim=0, stable=True)[:drop]
        keep = torch.ones_like(score, dtype=torch.bool)
        self.keep[col:col + span] = keep.scatter_(0, order, False)


@dataclass
class SweepResult:
    """Ŵ (rows, k) with exact zeros at the pruned weights, the keep mask, and for a quantized
    scheme the GPTQ result (codes, group parameters) of the kept weights."""

    w_hat: torch.Tensor
    keep: torch.Tensor
    gptq: object | None


def sparse_sweep(w: torch.Tensor, gram: torch.Tensor, pattern: Pattern, scheme: Scheme, *,
                 mask: torch.Tensor | None = None, damp: float = DEFAULT_DAMP, block: int = DEFAULT_BLOCK,
                 clip_search: bool = False) -> SweepResult:
    """SparseGPT of w (rows, k) with the Gram matrix XᵀX, jointly quantized when `scheme` is
    quantized (else pruned only); with `mask` given, GPTQ of that fixed mask's kept weights."""
    rows, k = w.shape
    if pattern.structured:
        # a float sweep decides every m columns, as the reference; a quantized one a whole
        # group ahead, so that the group's scale is found on the weights it will keep
        every = pattern.m if not scheme.quantized else scheme.group_for(k)
    else:
        every = None
    chooser = SweepMask(pattern, k, rows, every, mask, w.device)
    res = gptq_quantize(w, gram, scheme, damp=damp, block=block, act_order=False, clip_search=clip_search,
                        prune=chooser)
    keep = chooser.keep.T.contiguous()
    return SweepResult(res.w_hat * keep, keep, res if scheme.quantized else None)


# ---------------------------------------------------------------------------- storage

def store_pruned(name: str, w: np.ndarray, keep: np.ndarray, pattern: Pattern, scheme: Scheme, *,
                 clip_search: bool = False) -> Tensor:
    """The stored Tensor of a pruned float weight w (rows, k) (its pruned entries are ignored):
    float schemes dense with zeros, quantized n:m compressed (round-to-nearest of the kept
    values), quantized fractions dense (the zeros quantize to code z, exactly zero)."""
    w = np.where(keep, np.asarray(w, np.float32), np.float32(0.0))
    if not scheme.quantized:
        return float_tensor(name, w, scheme.kind)
    if not pattern.structured:
        clip = search_clip(w, scheme)[0] if clip_search else 1.0
        return scheme.quantize(name, w, clip=clip)
    clip = 1.0
    if clip_search:
        from qformat.schemes import compress_nm

        g = scheme.group_for(w.shape[1])
        kept_scheme = dataclasses.replace(scheme, group_size=g * pattern.n // pattern.m)
        clip = search_clip(compress_nm(w, keep, pattern.n, pattern.m)[0], kept_scheme)[0]
    return scheme.quantize_nm(name, w, keep, pattern.n, pattern.m, clip=clip)


def swept_tensor(name: str, res: SweepResult, pattern: Pattern, scheme: Scheme, rows: slice) -> Tensor:
    """The stored Tensor of rows `rows` of a joint sweep (codes as chosen, never re-quantized)."""
    g = res.gptq
    if not scheme.quantized:
        return float_tensor(name, res.w_hat[rows].cpu().numpy(), scheme.kind)
    if pattern.structured:
        return to_nm_tensor(name, g.codes[rows], g.scales[rows], g.zeros[rows], scheme,
                            res.keep[rows].cpu().numpy(), pattern.n, pattern.m)
    return to_tensor(name, g.codes[rows], g.scales[rows], g.zeros[rows], scheme)


def pruned_stats(t: Tensor, w: np.ndarray) -> QuantStats:
    """Errors of a stored pruned tensor against the unpruned weight (pruning included)."""
    err = t.dequantize() - w
    sq_err = float(np.square(err, dtype=np.float64).sum())
    return QuantStats(w.size, float(np.square(w, dtype=np.float64).sum()), sq_err, sq_err)


def magnitude_store(name: str, w: np.ndarray, pattern: Pattern, scheme: Scheme, *,
                    clip_search: bool = False) -> tuple[Tensor, QuantStats]:
    """Magnitude pruning then round-to-nearest: the path that needs no calibration."""
    w = np.asarray(w, np.float32)
    check_layer(pattern, name, w.shape, scheme)
    keep = magnitude_mask(torch.from_numpy(w), pattern).numpy()
    t = store_pruned(name, w, keep, pattern, scheme, clip_search=clip_search)
    return t, pruned_stats(t, w)


# ---------------------------------------------------------------------------- the layer method

@dataclass
class PruneMethod:
    """Pruning (and quantization) as a layerwise.LayerMethod. `how` chooses the mask
    (magnitude, wanda, sparsegpt); `quantizer` how kept weights are rounded: "rtn" rounds them
    to nearest after pruning (SparseGPT then reconstructs in float first), "gptq" runs the
    GPTQ sweep with the pruning inside it. `targets`: qbin names of the projections to prune
    (every projection not kept in 16 bits by --skip); others are not handled."""

    pattern: Pattern
    how: str
    quantizer: str = "rtn"
    targets: frozenset[str] = frozenset()
    damp: float = DEFAULT_DAMP
    block: int = DEFAULT_BLOCK
    clip_search: bool = False
    name: str = "prune"
    folds: bool = False

    def handles(self, planned) -> bool:
        """Whether the runner hands this planned projection to quantize()."""
        return planned.name in self.targets

    def fold_scales(self, names, stats, w, into, schemes) -> None:
        """Pruning folds nothing."""

    def quantize(self, names: list[str], stats, w: dict[str, torch.Tensor], schemes: dict[str, Scheme]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        by_scheme: dict[Scheme, list[str]] = {}
        for n in names:
            check_layer(self.pattern, n, tuple(w[n].shape), schemes[n])
            by_scheme.setdefault(schemes[n], []).append(n)
        for scheme, group in by_scheme.items():
            # rows are independent under every pattern, so projections sharing inputs run stacked
            stacked = torch.cat([w[n] for n in group], dim=0)
            joint = self.quantizer == "gptq" and scheme.quantized
            choose = MASKS[self.how]
            mask = choose(stacked, stats.gram, self.pattern) if choose is not None else None
            res = None
            if choose is None or joint:
                res = sparse_sweep(stacked, stats.gram, self.pattern, scheme if joint else _FLOAT, mask=mask,
                                   damp=self.damp, block=self.block, clip_search=self.clip_search)
            start = 0
            for n in group:
                rows = slice(start, start + w[n].shape[0])
                start = rows.stop
                if joint:
                    out[n] = swept_tensor(n, res, self.pattern, scheme, rows)
                else:
                    pruned = res.w_hat[rows] if res is not None else w[n]
                    keep = (res.keep if res is not None else mask)[rows]
                    out[n] = store_pruned(n, pruned.cpu().numpy(), keep.cpu().numpy(), self.pattern, scheme,
                                          clip_search=self.clip_search)
                w[n] = torch.from_numpy(out[n].dequantize()).to(w[n].device)
        return out


_FLOAT = Scheme("f32", "f32")


def check_prune_options(prune: str, prune_method: str) -> Pattern:
    """ValueError with one line for a pattern or pruning method that is not supported."""
    pattern = parse_pattern(prune)
    if prune_method not in PRUNE_METHODS:
        raise ValueError(f"prune method {prune_method!r}; expected one of {', '.join(PRUNE_METHODS)}")
    return pattern


def plan_pruning(planned: list, prune: str, skipped) -> frozenset[str]:
    """qbin names of the planned projections to prune: every decoder projection not matched by
    --skip (`skipped(planned)`); embeddings, head and norms never. ValueError with one line when
    a projection's shape or group size cannot hold the pattern."""
    pattern = parse_pattern(prune)
    targets = [p for p in planned if p.role == "linear" and not skipped(p)]
    for p in targets:
        check_layer(pattern, p.name, p.shape, p.scheme)
    return frozenset(p.name for p in targets)
