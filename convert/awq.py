"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, then a clipping search.

Facts from the reference (mit-han-lab/llm-awq auto_scale.py / auto_clip.py) followed here: the
scales are s = mean|x|^α per input channel, normalized by sqrt(max(s)·min(s)), for α on a grid
in [0, 1); the α whose quantized projections give the smallest output error wins; W becomes
W·diag(s) and the operation producing the inputs divides its output by s. Then per group a
clipping ratio of the range is searched against the output error, groups scored independently.
Differences: the output error of a candidate is computed exactly over *all* calibration tokens
from the input Gram matrix H = XᵀX (‖X(W − Ŵ)ᵀ‖² = tr(E H Eᵀ)) rather than on a token sample;
α = 0 (s = 1, plain round-to-nearest) is always a candidate, so the search never does worse than
RTN on its own objective.

Where the scales fold (so inference needs no extra op): q/k/v into the input RMSNorm weight,
gate/up into the post-attention RMSNorm weight, down into up_proj's rows. o_proj is not scaled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qformat import tensors as T
from qformat.schemes import Scheme, Tensor

from .groupquant import fake_quant, output_clip_search, quantize_to_tensor
from .outliers import KeepOptions, quantize_layer_kept

DEFAULT_GRID = 20


def _output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    e = w - w_hat
    return ((e @ gram) * e).sum()


def search_scales(weights: list[torch.Tensor], schemes: list[Scheme], gram: torch.Tensor, abs_mean: torch.Tensor,
                  grid: int = DEFAULT_GRID) -> tuple[torch.Tensor, float]:
    """The per-input-channel scales (k,) minimizing the summed output error of the quantized,
    scaled projections, and the α chosen."""
    best_s, best_alpha, best = torch.ones_like(abs_mean), 0.0, None
    x = abs_mean.clamp(min=1e-8)
    for i in range(grid):
        alpha = i / grid
        s = x.pow(alpha).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        loss = sum(_output_error(w, fake_quant(w * s, sc) / s, gram) for w, sc in zip(weights, schemes))
        if best is None or loss < best:
            best, best_s, best_alpha = loss, s, alpha
    return best_s, best_alpha


def fold(w: dict[str, torch.Tensor], names: list[str], into: str, s: torch.Tensor) -> None:
    """W[name] ← W[name]·diag(s); the producer `into` divides its output by s: a norm weight (k,)
    or a projection's rows (k, ·) together with its bias."""
    for n in names:
        w[n] = w[n] * s[None, :]
    if w[into].ndim == 1:
        w[into] = w[into] / s
    else:
        w[into] = w[into] / s[:, None]
        bias = {t.key: b.key for t, b in T.BIAS_OF.items()}.get(into)
        if bias in w:
            w[bias] = w[bias] / s


@dataclass
class AwqMethod:
    """AWQ as a layerwise.LayerMethod."""

    grid: int = DEFAULT_GRID
    clip_search: bool = True
    keep: KeepOptions = KeepOptions()  # outliers / 16-bit columns of the scaled weights (outliers.py)
    name: str = "awq"
    folds: bool = True

    def fold_scales(self, names, stats, w, into, schemes) -> None:
        s, _ = search_scales([w[n] for n in names], [schemes[n] for n in names], stats.gram, stats.abs_mean, self.grid)
        fold(w, names, into, s)

    def quantize(self, names: list[str], stats, w: dict[str, torch.Tensor], schemes: dict[str, Scheme]) -> dict[str, Tensor]:
        out = {}
        for n in names:
            if self.keep.active:
                out[n], w[n] = quantize_layer_kept(n, w[n], stats, schemes[n], self.keep, self.clip_search)
                continue
            ratio = output_clip_search(w[n], stats.gram, schemes[n]) if self.clip_search else 1.0
            out[n] = quantize_to_tensor(n, w[n], schemes[n], ratio)
            w[n] = fake_quant(w[n], schemes[n], ratio)
        return out
