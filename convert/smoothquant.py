"""SmoothQuant W8A8 (Xiao et al. 2023): int8 weights and int8 activations, outliers migrated.

Activations of LLMs have a few input channels far larger than the rest, so one int8 scale per
token wastes most codes on them. SmoothQuant divides channel j of a layer's input by
    s_j = max|X_j|^α / max|W_j|^(1−α)
and multiplies column j of the weights by s_j: the product is unchanged, the activation's range
shrinks, the weight's grows, and α sets how much of the difficulty moves. Facts from the
reference (mit-han-lab/smoothquant, smooth.py) followed here: max|X_j| is the largest magnitude
of channel j over all calibration tokens; max|W_j| the largest over the output rows of every
projection reading that input (q, k and v share one s; so do gate and up); s is floored at
1e-5; the division of the input is folded into the RMSNorm weight before, so inference has no
extra operation. Weights are then int8 per output channel (symmetric), activations int8 per
token (dynamic) or with one static scale per tensor.

Beyond the reference (which smooths only the two norm-fed groups): o_proj's input is folded into
v_proj's rows (the attention output is linear in v: dividing v's output channel by s divides
the same channel of every query head that reads it; under GQA one s is shared by the heads of
a group, computed from the maxima over the group), and down_proj's input into up_proj's rows
(the gated product is linear in up). Both folds are exact, and row scaling is free for weights
quantized per output channel. So nothing is left for `input_scale` in these architectures.

Static activation scales (`--act-static`) are chosen on the calibration inputs the quantized
model feeds each layer (the layer runner passes the earlier layers' int8-rounded outputs on):
minmax (largest |x|), percentile (99.99th of |x|), mse (the clipping threshold minimizing the
expected squared error of the int8 rounding), kl (TensorRT's entropy calibration: the threshold
whose 128-level quantized histogram of |x| is closest in KL divergence to the clipped original).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from qformat import tensors as T
from qformat.schemes import QUANT_KINDS, Scheme, Tensor

from .awq import fold
from .groupquant import fake_quant, quantize_to_tensor

ACT_CALIBS = ("minmax", "percentile", "mse", "kl")
DEFAULT_ALPHA = 0.5
PERCENTILE = 99.99
HIST_BINS = 2048  # TensorRT's entropy calibration histogram
KL_LEVELS = 128  # quantized levels of |x| for int8 (sign aside)
SCALE_FLOOR = 1e-5


def check_options(alpha: float | None, act_static: bool, act_calib: str | None, scheme: Scheme) -> None:
    """ValueError with one line naming the bad combination."""
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--smooth {alpha}: α must lie in [0, 1] (0.5 is the paper's default)")
    if (alpha is not None or act_static) and not scheme.act_bits:
        raise ValueError(f"--smooth/--act-static quantize activations; scheme {scheme.name} has float "
                         "activations (use --scheme w8a8)")
    if act_calib is not None and not act_static:
        raise ValueError("--act-calib chooses the static activation scale; add --act-static")
    if act_calib is not None and act_calib not in ACT_CALIBS:
        raise ValueError(f"--act-calib {act_calib!r}; expected one of {', '.join(ACT_CALIBS)}")


def describe(alpha: float | None, act_static: bool, act_calib: str | None) -> str:
    """The smoothing and activation mode as appended to the provenance's method."""
    smooth = f"smooth(alpha={alpha})" if alpha is not None else "no-smooth"
    act = f"static-{act_calib or 'minmax'}" if act_static else "dynamic"
    return f"+smoothquant({smooth}, act={act})"


def with_activation(t: Tensor, scheme: Scheme) -> Tensor:
    """The tensor marked as having int8 inputs (dynamic) when its scheme quantizes activations
    and nothing marked it yet (the SmoothQuant method marks static tensors itself)."""
    if not scheme.act_bits or t.kind not in QUANT_KINDS or t.activation is not None:
        return t
    return dataclasses.replace(t, activation={"bits": scheme.act_bits, "mode": "dynamic"})


# ---------------------------------------------------------------------------- smoothing

def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (k,) = max|X_j|^α / max|W_j|^(1−α), W_j over the rows of every weight (rows, k)."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = act_max.clamp(min=SCALE_FLOOR).pow(alpha) / w_max.clamp(min=SCALE_FLOOR).pow(1.0 - alpha)
    return s.clamp(min=SCALE_FLOOR)


def fold_attention_output(w: dict[str, torch.Tensor], act_max: torch.Tensor, alpha: float, head_dim: int) -> None:
    """Smooth o_proj's input by scaling v_proj's rows (and bias) by 1/s and o_proj's columns by s.

    o's input channel h·hd + d is channel d of query head h, which reads v channel
    (h // rep)·hd + d: the rep query heads of a KV group share one s, computed from the maxima
    over the group (activations and o's columns alike)."""
    wo, wv = w[T.ATTN_OUT.key], w[T.ATTN_V.key]
    kv_dim = wv.shape[0]
    rep = wo.shape[1] // kv_dim
    n_kv = kv_dim // head_dim
    a = act_max.reshape(n_kv, rep, head_dim).amax(1)  # (n_kv, hd)
    wmax = wo.abs().amax(0).reshape(n_kv, rep, head_dim).amax(1)
    s_kv = (a.clamp(min=SCALE_FLOOR).pow(alpha) / wmax.clamp(min=SCALE_FLOOR).pow(1.0 - alpha)).clamp(min=SCALE_FLOOR)
    s_o = s_kv[:, None, :].expand(n_kv, rep, head_dim).reshape(-1)
    w[T.ATTN_OUT.key] = wo * s_o[None, :]
    w[T.ATTN_V.key] = wv / s_kv.reshape(-1)[:, None]
    if T.ATTN_V_BIAS.key in w:
        w[T.ATTN_V_BIAS.key] = w[T.ATTN_V_BIAS.key] / s_kv.reshape(-1)


# ---------------------------------------------------------------------------- activations

def fake_quant_tokens(x: torch.Tensor, act_scale: float | None = None) -> torch.Tensor:
    """x (..., k) rounded to int8 per token and back, as the runtime does (kernels/reference.py
    quantize_tokens): scale max|x|/127 per token, or the static scale with saturation at ±127."""
    if act_scale is None:
        d = x.abs().amax(-1, keepdim=True) / 127.0
    else:
        d = torch.full_like(x[..., :1], float(act_scale))
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return torch.clamp(torch.round(x / safe), -127, 127) * d


def abs_histogram(chunks: list[torch.Tensor], bins: int = HIST_BINS) -> tuple[np.ndarray, float]:
    """(counts (bins,) over [0, max|x|], max|x|) of every element of the chunks."""
    top = max(float(c.abs().amax()) for c in chunks)
    if not top > 0:
        return np.zeros(bins), 0.0
    counts = torch.zeros(bins, dtype=torch.float64)
    for c in chunks:
        counts += torch.histc(c.abs().float().flatten(), bins=bins, min=0.0, max=top).double().cpu()
    return counts.numpy(), top


def _threshold_percentile(counts: np.ndarray, top: float, pct: float = PERCENTILE) -> float:
    cdf = np.cumsum(counts) / counts.sum()
    i = int(np.searchsorted(cdf, pct / 100.0))
    return (min(i, counts.size - 1) + 1) * top / counts.size


def _threshold_mse(counts: np.ndarray, top: float, candidates: int = 200) -> float:
    """The clip threshold T minimizing Σ count·error²: values above T lose (|x| − T), values
    below it are rounded with step T/127 (uniform error, step²/12 on average)."""
    width = top / counts.size
    centers = (np.arange(counts.size) + 0.5) * width
    best_t, best = top, np.inf
    for t in np.linspace(top / candidates, top, candidates):
        step = t / 127.0
        clipped = np.maximum(centers - t, 0.0)
        err = float((counts * (clipped ** 2)).sum() + counts[centers <= t].sum() * step * step / 12.0)
        if err < best:
            best_t, best = t, err
    return float(best_t)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


def _threshold_kl(counts: np.ndarray, top: float, levels: int = KL_LEVELS) -> float:
    """TensorRT's entropy calibration on the histogram of |x|.

    For every candidate cut i ≥ levels bins: P = the first i bins with the mass beyond the cut
    added to the last one (clipping); Q = P's first i bins merged into `levels` equal chunks, each
    chunk's mass spread evenly over its nonzero bins (what int8 rounding can represent); keep the
    i of least KL(P‖Q). The threshold is the cut's upper edge."""
    n = counts.size
    width = top / n
    best_i, best = n, np.inf
    for i in range(levels, n + 1):
        src = counts[:i]
        p = src.astype(np.float64).copy()
        p[-1] += counts[i:].sum()
        edges = np.linspace(0, i, levels + 1).astype(np.int64)  # strictly rising: i >= levels
        nz = src > 0
        mass = np.add.reduceat(src, edges[:-1])
        filled = np.add.reduceat(nz.astype(np.float64), edges[:-1])
        q = np.repeat(np.divide(mass, filled, out=np.zeros_like(mass), where=filled > 0), np.diff(edges)) * nz
        if p.sum() <= 0 or q.sum() <= 0:
            continue
        # bins P has but Q lacks (only the clipped mass can do that) get a tiny floor, as usual
        qn = q / q.sum()
        qn = np.where((p > 0) & (qn == 0), 1e-12, qn)
        kl = _kl(p / p.sum(), qn)
        if kl < best:
            best_i, best = i, kl
    return best_i * width


def static_scale(chunks: list[torch.Tensor], how: str) -> float:
    """The static int8 scale (threshold / 127) of a layer's calibration inputs, by `how`."""
    if how == "minmax":
        top = max(float(c.abs().amax()) for c in chunks)
        return max(top, SCALE_FLOOR) / 127.0
    counts, top = abs_histogram(chunks)
    if top == 0:
        return SCALE_FLOOR / 127.0
    threshold = {"percentile": _threshold_percentile, "mse": _threshold_mse, "kl": _threshold_kl}[how](counts, top)
    return max(threshold, SCALE_FLOOR) / 127.0


# ---------------------------------------------------------------------------- the method

@dataclass
class SmoothQuantMethod:
    """SmoothQuant as a layerwise.LayerMethod.

    alpha None: no smoothing (plain W8A8, e.g. to calibrate static scales only). `inner`: the
    layerwise method that quantizes the (smoothed) weights, e.g. GPTQ; None: round-to-nearest.
    The runner calls quantize_inputs on each stage's inputs before quantize: it returns them as
    the runtime will see them (int8-rounded) and, for static activations, fixes the scale that
    quantize then stores."""

    alpha: float | None = DEFAULT_ALPHA
    static: bool = False
    act_calib: str = "minmax"
    head_dim: int = 0  # > 0: also fold o_proj's input into v_proj (fold_attention_output)
    inner: object | None = None
    name: str = "smoothquant"
    _act_scales: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def folds(self) -> bool:
        return self.alpha is not None

    @property
    def folds_v_o(self) -> bool:
        return self.alpha is not None and self.head_dim > 0

    def fold_scales(self, names, stats, w, into, schemes) -> None:
        if self.alpha is None:
            return
        if into == T.ATTN_V.key:
            fold_attention_output(w, stats.abs_max, self.alpha, self.head_dim)
            return
        fold(w, names, into, smooth_scales(stats.abs_max, [w[n] for n in names], self.alpha))

    def quantize_inputs(self, names: list[str], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        scale = None
        if self.static:
            scale = static_scale(inputs, self.act_calib)
            self._act_scales.update({n: scale for n in names})
        return [fake_quant_tokens(c, scale) for c in inputs]

    def quantize(self, names: list[str], stats, w: dict[str, torch.Tensor], schemes: dict[str, Scheme]) -> dict[str, Tensor]:
        if self.inner is not None:
            out = self.inner.quantize(names, stats, w, schemes)
        else:
            out = {}
            for n in names:
                out[n] = quantize_to_tensor(n, w[n], schemes[n])
                w[n] = fake_quant(w[n], schemes[n])
        for n in names:
            t = out[n]
            if self.static:
                arrays = dict(t.arrays, act_scale=np.array([self._act_scales.pop(n)], np.float32))
                out[n] = dataclasses.replace(t, arrays=arrays, activation={"bits": 8, "mode": "static"})
            elif schemes[n].act_bits:
                out[n] = with_activation(t, schemes[n])
        return out


# ---------------------------------------------------------------------------- evaluation

def hook_activation_quantization(model, reader) -> int:
    """Give a float transformers model (weights = the qbin `reader`'s dequantized tensors) the
    activation quantization of the file: every nn.Linear whose tensor has `activation` (W8A8,
    spec §6.5) sees its input as the runtime computes with it: x / input_scale, rounded to int8
    per token (or with the static act_scale), 16-bit columns (fp_cols) left unrounded (the
    dequantized weight is zero there but for fp_weight). Returns the number of layers hooked."""
    from .architectures import TENSOR_MAP

    def hook_for(t):
        a = t.arrays
        inv = torch.from_numpy(1.0 / np.asarray(a["input_scale"], np.float32)) if "input_scale" in a else None
        cols = torch.from_numpy(np.asarray(a["fp_cols"], np.int64)) if "fp_cols" in a else None
        static = float(a["act_scale"][0]) if t.activation.get("mode") == "static" else None

        def pre_hook(module, args):
            x = args[0] if inv is None else args[0] * inv
            xi = x if cols is None else x.index_fill(-1, cols, 0.0)
            q = fake_quant_tokens(xi, static)
            if cols is not None:
                q[..., cols] = x[..., cols]
            return (q,)
        return pre_hook

    hooked = 0
    for rule in TENSOR_MAP:
        for i in (range(reader.model.n_layers) if rule.per_layer else [None]):
            name = rule.qbin_name(i)
            hf = rule.hf_name(i)
            if name == "tok_embeddings":  # a lookup; its activation (if any) belongs to a tied head
                if "output" in reader or reader[name].activation is None:
                    continue
                hf = "lm_head.weight"
            if name not in reader or reader[name].activation is None:
                continue
            model.get_submodule(hf.removesuffix(".weight")).register_forward_pre_hook(hook_for(reader[name]))
            hooked += 1
    return hooked
