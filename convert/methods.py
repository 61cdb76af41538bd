"""The quantization methods of `--method`, as one table: what each defaults to, what it combines
with, how the provenance names it, and the layerwise.LayerMethod that runs it.

Pruning (`--prune`) and SmoothQuant (`--smooth`, `--act-static`) are applied on top of a method:
the pruning sweep rounds the kept weights with the method's quantizer, SmoothQuant quantizes the
smoothed weights with the method's layer method.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .awq import AwqMethod
from .gptq import GptqMethod
from .imatrix import ImatrixMethod
from .outliers import KeepOptions, RtnKeepMethod
from .prune import PruneMethod, parse_pattern
from .qat import QatMethod
from .smoothquant import SmoothQuantMethod


@dataclass(frozen=True)
class Method:
    """One `--method`. `layer(options, clip_search)` is its layer method, or None when the
    method needs no calibration by itself (round-to-nearest without 16-bit weights)."""

    name: str
    calibrated: bool  # reads calibration data (rtn does only to keep 16-bit weights, to prune, to smooth)
    clip_search: bool  # the default of --clip-search (measured; see ConvertOptions.clip)
    prune_method: str  # the default --prune-method with this method
    prunes: bool  # combines with --prune
    smooths: bool  # combines with --smooth / --act-static
    describe: Callable[[object], str]  # its parameters as the provenance records them
    names_calibration: bool  # describe() names the calibration data itself
    layer: Callable[[object, bool], object | None]


def _gptq(o, clip: bool) -> GptqMethod:
    return GptqMethod(damp=o.damp, block=o.block, act_order=o.gptq_act_order, clip_search=clip, keep=o.keep,
                      static_groups=o.gptq_static_groups)


def _qat(o, clip: bool) -> QatMethod:
    init = METHODS[o.qat_init].layer(o, clip) or RtnKeepMethod(o.keep, clip)
    return QatMethod(init, o.qat)


METHODS: dict[str, Method] = {m.name: m for m in (
    # round-to-nearest: weight-MSE clip search raises perplexity (ConvertOptions.clip); the
    # calibrated mask that updates nothing is Wanda's
    Method("rtn", calibrated=False, clip_search=False, prune_method="wanda", prunes=True, smooths=True,
           describe=lambda o: "rtn", names_calibration=False,
           layer=lambda o, clip: RtnKeepMethod(o.keep, clip) if o.keep.active else None),
    # GPTQ: one sweep prunes and quantizes, each compensating the other (SparseGPT)
    Method("gptq", calibrated=True, clip_search=True, prune_method="sparsegpt", prunes=True, smooths=True,
           describe=lambda o: (f"gptq(damp={o.damp}, block={o.block}, act_order={o.gptq_act_order}, "
                               + ("static_groups=True, " if o.gptq_static_groups else "") +
                               f"calib={o.calib_name}, {o.calib_samples}x{o.calib_seqlen})"),
           names_calibration=True, layer=_gptq),
    # AWQ: its scales are searched on the dense weights and folded into the norms, so neither
    # pruning nor SmoothQuant's own folding combines with it
    Method("awq", calibrated=True, clip_search=True, prune_method="wanda", prunes=False, smooths=False,
           describe=lambda o: (f"awq(grid={o.awq_grid}, clip_search=True, calib={o.calib_name}, "
                               f"{o.calib_samples}x{o.calib_seqlen})"),
           names_calibration=True, layer=lambda o, clip: AwqMethod(grid=o.awq_grid, clip_search=clip, keep=o.keep)),
    # importance-weighted rounding (llama.cpp's imatrix): a per-group scale search weighted by
    # E[x²] per input column, no error compensation; its search is its clipping
    Method("imatrix", calibrated=True, clip_search=True, prune_method="wanda", prunes=False, smooths=False,
           describe=lambda o: f"imatrix(calib={o.calib_name}, {o.calib_samples}x{o.calib_seqlen})",
           names_calibration=True, layer=lambda o, clip: ImatrixMethod(keep=o.keep)),
    # EfficientQAT (qat.py): an init method (qat_init) quantizes each layer, Block-AP trains it
    # against the float layer, E2E-QP trains the scales end to end; clip search as its init's
    Method("qat", calibrated=True, clip_search=True, prune_method="wanda", prunes=False, smooths=False,
           describe=lambda o: f"qat(init={METHODS[o.qat_init].describe(o)}, {o.qat.describe()})",
           names_calibration=True, layer=_qat),
)}
# What --qat-init may name: the methods whose layers QAT can train (dense group grids).
QAT_INITS = ("gptq", "awq", "rtn")


def layer_method(options, prune_targets: frozenset[str] = frozenset(), head_dim: int = 0):
    """The layerwise.LayerMethod a conversion with `options` (a ConvertOptions) runs: SmoothQuant
    over the method's quantizer, or the pruning sweep with it (of the projections named in
    prune_targets), or the method itself. head_dim lets SmoothQuant fold o_proj's scales into
    v_proj (smoothquant.fold_attention_output)."""
    method = METHODS[options.method]
    clip = options.clip
    if options.smoothquant:
        inner = method.layer(replace(options, outliers=None, outlier_threshold=None), clip)
        return SmoothQuantMethod(options.smooth, options.act_static, options.act_calib or "minmax", head_dim, inner)
    if options.prune is not None:
        return PruneMethod(parse_pattern(options.prune), options.pruning, options.method, prune_targets,
                           damp=options.damp, block=options.block, clip_search=clip)
    layer = method.layer(options, clip)
    if layer is None:
        raise ValueError(f"method {options.method!r} is not a calibrated method")
    return layer


__all__ = ["KeepOptions", "METHODS", "QAT_INITS", "Method", "layer_method"]
