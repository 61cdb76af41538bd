"""Importance-weighted rounding (`--method imatrix`): round-to-nearest whose group scales are
searched for the least error weighted by the calibration activations' second moments.

llama.cpp's quantizers with an importance matrix do this: each input column j of a layer gets
the weight a_j = E[x_j²] over calibration tokens (the diagonal of the layer's Hessian XᵀX / N),
and each group's (scale, zero) is chosen to minimize Σ_j a_j (w_j − ŵ_j)², the layer-output
error of that group with the columns' correlations ignored. Per group the search tries the
min/max range shrunk by each ratio of CLIP_GRID; for each, it refits the scale to the codes it
gives by weighted least squares (s = Σ a x (q − z) / Σ a (q − z)², rounded to float16), re-rounds
with the refitted scale, and keeps the candidate of least weighted error. Unlike GPTQ, no error
is pushed onto other columns: nothing is fitted to the calibration inputs beyond which columns
matter, which is why it may generalize better to text unlike the calibration data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qformat.schemes import Scheme, Tensor

from .groupquant import CLIP_GRID, codes_of, dequant, group_params, is_nf4, stored_scale, to_tensor
from .outliers import KeepOptions

# Rows per block of the search: bounds its working set (grid candidates of a block of groups).
ROWS_PER_BLOCK = 4096


def _refit(x: torch.Tensor, a: torch.Tensor, q: torch.Tensor, z: torch.Tensor, s: torch.Tensor,
           scheme: Scheme) -> torch.Tensor:
    """The stored scale minimizing Σ a (x − s (q − z))² for fixed codes; s where that is undefined."""
    d = q - z
    den = (a * d * d).sum(-1, keepdim=True)
    fit = (a * x * d).sum(-1, keepdim=True) / den.clamp_min(1e-30)
    return torch.where((den > 0) & (fit > 0), stored_scale(fit, scheme), s)


def search_group(x: torch.Tensor, a: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of groups x (rows, G) minimizing the a-weighted squared error (a: (G,))."""
    best_s, best_z = group_params(x, scheme)
    best = None
    for r in CLIP_GRID:
        s, z = group_params(x, scheme, r)
        for scale in (s, None):
            if scale is None:  # the refit of this candidate
                if is_nf4(scheme):
                    continue
                scale = _refit(x, a, codes_of(x, s, z, scheme), z, s, scheme)
            err = (a * (dequant(codes_of(x, scale, z, scheme), scale, z, scheme) - x) ** 2).sum(-1)
            if best is None:
                best, best_s, best_z = err, scale, z
                continue
            better = err < best
            best = torch.where(better, err, best)
            best_s = torch.where(better[:, None], scale, best_s)
            best_z = torch.where(better[:, None], z, best_z)
    return best_s, best_z


def imatrix_quantize(w: torch.Tensor, importance: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor,
                                                                                           torch.Tensor]:
    """(codes, scales, zeros) of w (rows, k) under per-column importance (k,), group by group."""
    rows, k = w.shape
    g = scheme.group_for(k)
    n_groups = -(-k // g)
    codes = torch.empty_like(w)
    scales = torch.empty(rows, n_groups, device=w.device)
    zeros = torch.empty(rows, n_groups, device=w.device)
    a_all = importance.to(w.device, torch.float32).clamp_min(0)
    a_all = a_all + 1e-8 * a_all.mean().clamp_min(1e-30)  # dead columns still get rounded
    for r0 in range(0, rows, ROWS_PER_BLOCK):
        rs = slice(r0, min(rows, r0 + ROWS_PER_BLOCK))
        for gi, j in enumerate(range(0, k, g)):
            x = w[rs, j:j + g]
            s, z = search_group(x, a_all[j:j + g], scheme)
            codes[rs, j:j + g] = codes_of(x, s, z, scheme)
            scales[rs, gi] = s[:, 0]
            zeros[rs, gi] = z[:, 0]
    return codes, scales, zeros


def imatrix_tensor(name: str, w: torch.Tensor, importance: torch.Tensor, scheme: Scheme) -> tuple[Tensor, torch.Tensor]:
    """The stored tensor and its dequantized weight."""
    codes, scales, zeros = imatrix_quantize(w, importance, scheme)
    g = scheme.group_for(w.shape[1])
    idx = torch.arange(w.shape[1], device=w.device) // g
    w_hat = dequant(codes, scales[:, idx], zeros[:, idx], scheme)
    return to_tensor(name, codes, scales, zeros, scheme), w_hat


@dataclass(frozen=True)
class ImatrixMethod:
    """Importance-weighted rounding as a layerwise.LayerMethod (the importance: diag(XᵀX))."""

    keep: KeepOptions = KeepOptions()
    name: str = "imatrix"
    folds: bool = False

    def fold_scales(self, names, stats, w, into, schemes) -> None:
        """Rounding folds nothing."""

    def quantize(self, names: list[str], stats, w: dict[str, torch.Tensor],
                 schemes: dict[str, Scheme]) -> dict[str, Tensor]:
        importance = torch.diagonal(stats.gram)
        out = {}
        for n in names:
            out[n], w[n] = imatrix_tensor(n, w[n], importance, schemes[n])
        return out
