"""Weights kept exactly in 16 bits beside a quantized dense part.

Two sidecars of the format (spec/qbin.md §6.2, §6.4), both ADDED to the dequantized dense part:

* Sparse outliers (SpQR, Dettmers et al. 2023; SqueezeLLM's dense-and-sparse, Kim et al. 2023):
  a fraction of each projection's weights, chosen by their effect on the layer output, stored as
  CSR over output rows (i32 row pointers, u16 columns, f16 values). The dense part is quantized
  *without* them: they are zero there, so the range of every group that held one shrinks.
* 16-bit input columns (LLM.int8(), Dettmers et al. 2022): input channels whose calibration
  activations reach a threshold (any token's |x_j| >= 6.0 in the paper) keep their whole weight
  column in f16 (`fp_cols`, `fp_weight`); the dense part stores zero there.

Selection. The output error of a quantized layer is tr(E H Eᵀ) with H = XᵀX; with the diagonal
approximation a weight's error costs (w − ŵ)²·d_j, d_j = ‖X_j‖² for round-to-nearest. Keeping a
weight exactly saves its own error and, when it is its group's minimum or maximum, shrinks the
group's range, which lowers the error of every other weight of the group (SpQR's leave-one-out
error). `select_outliers` scores both effects exactly (a weight that is not a group extreme does
not change the range, so only the current extremes need a leave-one-out requantization) and
picks the best in a few greedy rounds, re-scoring after each. Inside GPTQ, d_j = 1/U_jj² with U
the Cholesky factor of H⁻¹: SpQR's criterion (w − q)²/U_jj², the error GPTQ would propagate.

Facts from SpQR's reference (Vahe1994/SpQR, spqr_engine.py) followed here: group statistics are
fitted without the outliers; an outlier's quantization error is zero during the GPTQ sweep (it
is kept at its current, already error-compensated value, so nothing is propagated from it).
Differences: SpQR keeps every weight whose score passes a threshold relative to the layer's
mean; here the budget is a fixed fraction of each projection's weights, so the file's size is
known from the command line (`--outliers 1%` is 1% of every projection's weights, counted
exactly in the reported bits per weight), and the weights compete across the whole tensor
(rows and groups with more outliers get more: a per-row quota would waste slots on quiet rows).
GPTQ quantizes the projections that share their inputs (q/k/v, gate/up) in one run over their
stacked rows; there they share one budget, the same fraction of their weights together.

Measured on SmolLM2-135M (12 projections of layers 2, 15 and 28, 8 x 256 pydoc tokens; relative
output error summed over them, round-to-nearest, 1% kept): int4-g64 0.080 without outliers,
0.061 choosing by |w|, 0.050 by |w|·‖X_j‖, 0.036 by the exact gain in one round and 0.034 in 4
rounds (8 rounds: 0.033); int3-g64 0.343, 0.266, 0.217, 0.179, 0.171 (0.170).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qformat.schemes import Scheme, Tensor

from .groupquant import codes_of, dequant, group_params, is_nf4, output_clip_search, quantize_to_tensor

# Greedy rounds of select_outliers: each picks a share of the remaining budget, then re-scores.
DEFAULT_ROUNDS = 4
# The largest --outliers fraction accepted: at 32+ bits per outlier 10% costs 3.2 extra bits per
# weight, more than going up a whole scheme.
MAX_FRACTION = 0.1


def parse_fraction(value: str | float) -> float:
    """"0.5%" -> 0.005, "0.01" -> 0.01; ValueError with one line when out of (0, MAX_FRACTION]."""
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"outlier fraction {value!r} is not a number; write e.g. 0.5% or 0.005") from None
    if not 0 < fraction <= MAX_FRACTION:
        raise ValueError(f"outlier fraction {value!r} out of range; use more than 0 and at most "
                         f"{MAX_FRACTION:.0%} (e.g. 0.5% or 1%)")
    return fraction


def check_threshold(value: float) -> float:
    """The activation threshold, or ValueError when it is not a positive finite number."""
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"outlier threshold {value!r} must be a positive number (LLM.int8() uses 6.0)")
    return float(value)


# ---------------------------------------------------------------------------- selection

def _grouped(x: torch.Tensor, g: int, fill: float = 0.0) -> torch.Tensor:
    """(rows, k) -> (rows, n_groups, g), the last group padded with `fill`."""
    rows, k = x.shape
    pad = (-k) % g
    if pad:
        x = torch.cat([x, torch.full((rows, pad), fill, dtype=x.dtype, device=x.device)], dim=1)
    return x.reshape(rows, -1, g)


def _errors(wg: torch.Tensor, kept: torch.Tensor, d: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Weighted squared error per weight of round-to-nearest of groups wg (…, G) with the kept
    weights excluded: they are zero in the dense part (zero is always representable exactly and
    never widens a range, which includes 0) and cost nothing."""
    wz = torch.where(kept, 0.0, wg)
    s, z = group_params(wz, scheme)
    e = (dequant(codes_of(wz, s, z, scheme), s, z, scheme) - wg).square() * d
    return torch.where(kept, 0.0, e)


def exclusion_gain(w: torch.Tensor, d: torch.Tensor, kept: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """(rows, k): how much the weighted error Σ (w − ŵ)²·d_j of round-to-nearest drops when each
    weight is also kept exactly (0 for those already kept)."""
    rows, k = w.shape
    g = scheme.group_for(k)
    wg, dg = _grouped(w, g), _grouped(d[None, :].expand(rows, k), g)
    kg = _grouped(kept, g, fill=True)  # padding counts as kept: never scored, never chosen
    e = _errors(wg, kg, dg, scheme)
    gain = e.clone()  # a weight inside the range saves its own error only
    total = e.sum(-1, keepdim=True)
    wz = torch.where(kg, 0.0, wg)
    extremes = [wz.abs().argmax(-1, keepdim=True)] if scheme.symmetric or is_nf4(scheme) else \
        [wz.argmax(-1, keepdim=True), wz.argmin(-1, keepdim=True)]
    for idx in extremes:
        # leave-one-out: requantize the group without its extreme, whose own error then is zero
        without = kg.scatter(-1, idx, True)
        loo = total - _errors(wg, without, dg, scheme).sum(-1, keepdim=True)
        gain.scatter_(-1, idx, loo)  # may be below its own error: the new grid can fit worse
    gain = torch.where(kg, -1.0, gain)
    return gain.reshape(rows, -1)[:, :k]


def select_outliers(w: torch.Tensor, d: torch.Tensor, scheme: Scheme, count: int, *,
                    kept: torch.Tensor | None = None, rounds: int = DEFAULT_ROUNDS) -> torch.Tensor:
    """Bool mask (rows, k) of the `count` weights of w whose exact storage lowers the weighted
    output error Σ (w − ŵ)²·d_j of round-to-nearest the most, chosen greedily in `rounds`
    rounds. `kept`: weights already kept (e.g. 16-bit columns), never counted in `count`."""
    w = w.to(torch.float32)
    d = d.to(torch.float32).clamp(min=0)
    mask = torch.zeros_like(w, dtype=torch.bool) if kept is None else kept.clone()
    left = min(count, int((~mask).sum()))
    for r in range(rounds):
        take = left if r == rounds - 1 else -(-left // (rounds - r))
        if take <= 0:
            break
        gain = exclusion_gain(w, d, mask, scheme).reshape(-1)
        idx = torch.topk(gain, take).indices
        mask.view(-1)[idx] = True
        left -= take
    return mask if kept is None else mask & ~kept


def outlier_count(n_weights: int, fraction: float | None) -> int:
    """The number of outliers a tensor of n_weights gets (0 without a fraction)."""
    return int(round(n_weights * fraction)) if fraction else 0


def fp_columns(abs_max: torch.Tensor | None, threshold: float | None) -> np.ndarray:
    """Input channels whose calibration activations reach `threshold` in magnitude (LLM.int8())."""
    if threshold is None or abs_max is None:
        return np.zeros(0, np.int32)
    return torch.nonzero(abs_max >= threshold).flatten().cpu().numpy().astype(np.int32)


# ---------------------------------------------------------------------------- storage

def attach(t: Tensor, w: np.ndarray, outliers: np.ndarray | None, fp_cols: np.ndarray | None) -> Tensor:
    """t with the sidecars that restore w (rows, k, input-channel order) exactly up to float16
    rounding at the `outliers` positions (bool mask, input order) and in the `fp_cols` columns.

    The stored values are w − ŵ_dense (spec §6.2, §6.4), so they are exact whatever the dense part
    holds there (the quantizers here put zero, so the values are the weights themselves).
    """
    rows, k = t.shape
    has_fp = fp_cols is not None and fp_cols.size > 0
    has_csr = outliers is not None and bool(outliers.any())
    if not has_fp and not has_csr:
        return t
    dense = t.dequantize()  # no sidecars yet: the dense part alone
    arrays = dict(t.arrays)
    if has_fp:
        cols = np.sort(np.asarray(fp_cols, np.int64))
        arrays["fp_cols"] = cols.astype(np.int32)
        arrays["fp_weight"] = np.ascontiguousarray((w[:, cols] - dense[:, cols]).astype(np.float16))
    if has_csr:
        mask = np.asarray(outliers, bool)
        if has_fp:
            mask = mask.copy()
            mask[:, fp_cols] = False  # a 16-bit column already holds them
        r, c = np.nonzero(mask)  # row-major: rows ascending, columns ascending within a row
        arrays["outlier_rowptr"] = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=rows))]).astype(np.int32)
        arrays["outlier_cols"] = c.astype(np.uint16 if k <= 1 << 16 else np.int32)
        arrays["outlier_values"] = (w[r, c] - dense[r, c]).astype(np.float16)
    return Tensor(t.name, t.kind, t.shape, arrays, t.group_size, t.symmetric, t.sparsity, t.activation)


def kept_mask(shape: tuple[int, int], outliers: torch.Tensor | None, fp_cols: np.ndarray, device) -> torch.Tensor:
    """Every weight stored outside the dense part: the outliers and the 16-bit columns."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device) if outliers is None else outliers.clone()
    if fp_cols.size:
        mask[:, torch.as_tensor(fp_cols, device=device).long()] = True
    return mask


def quantize_kept(name: str, w: torch.Tensor, scheme: Scheme, outliers: torch.Tensor | None,
                  fp_cols: np.ndarray, ratio: torch.Tensor | float = 1.0) -> tuple[Tensor, torch.Tensor]:
    """Round-to-nearest of w (rows, k) with the outliers and 16-bit columns kept out of the dense
    part (zero there, so they do not stretch any group's range); returns the stored Tensor and
    its dequantized value Ŵ (dense + sidecars, exactly what a reader computes)."""
    kept = kept_mask(tuple(w.shape), outliers, fp_cols, w.device)
    dense = quantize_to_tensor(name, torch.where(kept, 0.0, w), scheme, ratio)
    t = attach(dense, w.cpu().numpy(), None if outliers is None else outliers.cpu().numpy(), fp_cols)
    return t, torch.from_numpy(t.dequantize()).to(w.device)


@dataclass(frozen=True)
class KeepOptions:
    """What a calibrated method keeps in 16 bits: a fraction of outlier weights per projection
    (None: none) and the activation threshold marking 16-bit input columns (None: none)."""

    fraction: float | None = None
    threshold: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.fraction) or self.threshold is not None

    def check(self) -> None:
        """ValueError with one line when a value is out of range."""
        if self.fraction is not None:
            parse_fraction(self.fraction)
        if self.threshold is not None:
            check_threshold(self.threshold)

    def describe(self) -> str:
        """The options as the provenance records them ("" when inactive)."""
        parts = []
        if self.fraction:
            parts.append(f"outliers={100 * self.fraction:g}%")
        if self.threshold is not None:
            parts.append(f"outlier_threshold={self.threshold:g}")
        return "+".join(parts)


def choose(w: torch.Tensor, d: torch.Tensor, abs_max: torch.Tensor | None, scheme: Scheme,
           keep: KeepOptions) -> tuple[torch.Tensor | None, np.ndarray]:
    """(outlier mask or None, 16-bit columns) of one weight w (rows, k) under `keep`; d (k,) is
    the per-column weight of a weight's squared error in the layer output."""
    cols = fp_columns(abs_max, keep.threshold)
    count = outlier_count(w.numel(), keep.fraction)
    if not count:
        return None, cols
    base = kept_mask(tuple(w.shape), None, cols, w.device) if cols.size else None
    return select_outliers(w, d, scheme, count, kept=base), cols


def select_kept(w: torch.Tensor, hinv: torch.Tensor, scheme: Scheme, count: int, fp_cols: np.ndarray | None,
                perm: np.ndarray | None) -> torch.Tensor:
    """GPTQ's kept weights (rows, k) in stored column order: the 16-bit columns `fp_cols` (input
    channel numbers; stored column j is channel perm[j]) and `count` outliers scored by SpQR's
    criterion (w − q)²/U_jj², U = hinv the upper Cholesky factor of H⁻¹, on the weights as they
    enter the sweep."""
    rows, k = w.shape
    base = torch.zeros(rows, k, dtype=torch.bool, device=w.device)
    if fp_cols is not None and len(fp_cols):
        channel = torch.arange(k, device=w.device) if perm is None else torch.as_tensor(perm, device=w.device).long()
        base[:, torch.isin(channel, torch.as_tensor(fp_cols, device=w.device).long())] = True
    if not count:
        return base
    d = torch.diagonal(hinv).to(torch.float32).clamp(min=1e-12).pow(-2)
    return base | select_outliers(w, d, scheme, count, kept=base)


@dataclass
class RtnKeepMethod:
    """Round-to-nearest with outliers / 16-bit columns as a layerwise.LayerMethod: RTN itself needs
    no calibration, but choosing what to keep does (‖X_j‖², max |X_j|), so it runs layer by layer
    on the calibration batch like GPTQ and AWQ. With clip_search, each group's clipping ratio is
    searched against its output error (groupquant.output_clip_search)."""

    keep: KeepOptions
    clip_search: bool = False
    name: str = "rtn"
    folds: bool = False

    def fold_scales(self, names, stats, w, into, schemes) -> None:
        """Round-to-nearest folds nothing."""

    def quantize(self, names: list[str], stats, w: dict[str, torch.Tensor], schemes: dict[str, Scheme]) -> dict[str, Tensor]:
        out = {}
        d = torch.diagonal(stats.gram)
        for n in names:
            out[n], w[n] = quantize_layer_kept(n, w[n], stats, schemes[n], self.keep, self.clip_search, d)
        return out


def quantize_layer_kept(name: str, w: torch.Tensor, stats, scheme: Scheme, keep: KeepOptions,
                        clip_search: bool, d: torch.Tensor | None = None) -> tuple[Tensor, torch.Tensor]:
    """One projection by round-to-nearest with what `keep` asks kept in 16 bits, chosen on the
    calibration statistics `stats` (layerwise.InputStats); returns (Tensor, Ŵ)."""
    d = torch.diagonal(stats.gram) if d is None else d
    outliers, cols = choose(w, d, stats.abs_max, scheme, keep)
    kept = kept_mask(tuple(w.shape), outliers, cols, w.device)
    ratio = output_clip_search(torch.where(kept, 0.0, w), stats.gram, scheme) if clip_search else 1.0
    return quantize_kept(name, w, scheme, outliers, cols, ratio)


@dataclass
class KeepTally:
    """What a conversion kept in 16 bits, for its summary."""

    weights: int = 0  # weights of the quantized projections
    outliers: int = 0  # entries of the sparse sidecars
    columns: int = 0  # 16-bit input columns, summed over projections
    projections_with_columns: int = 0

    def add(self, role: str, t: Tensor) -> None:
        if role != "linear" or len(t.shape) != 2 or "codes" not in t.arrays:
            return
        self.weights += t.shape[0] * t.shape[1]
        self.outliers += int(t.arrays["outlier_cols"].size) if "outlier_cols" in t.arrays else 0
        if "fp_cols" in t.arrays:
            self.columns += int(t.arrays["fp_cols"].size)
            self.projections_with_columns += 1

    def line(self) -> str:
        share = 100 * self.outliers / max(self.weights, 1)
        return (f"kept in 16 bits: {self.outliers} outlier weights ({share:.2f}% of the projections'), "
                f"{self.columns} input columns in {self.projections_with_columns} projections")
