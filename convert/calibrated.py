"""The converter's entry to calibrated methods: the calibration data and the tensor stream.

convert() calls `prepare` once (tokenizes / samples the calibration data) and then iterates
`stream`, which yields every planned tensor in file order like the plain RTN loop does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .calibration import Calibration, calibration_tokens
from .layerwise import LayerReport, best_device, calibrated_stream
from .methods import layer_method
from .options import ConvertOptions


def prepare(src: str | Path, options: ConvertOptions, fingerprint: str | None = None) -> Calibration:
    """The calibration token matrix for a checkpoint folder (`fingerprint`: a hash of its files,
    which lets self-sampled windows be reused; see calibration.cached_self_sampled)."""
    return calibration_tokens(src, options.calib, options.calib_samples, options.calib_seqlen, options.seed,
                              fingerprint=fingerprint)


def stream(ckpt, args, planned: list, calib: Calibration, options: ConvertOptions, store: Callable, *,
           reports: list[LayerReport] | None = None,
           prune_targets: frozenset[str] = frozenset()) -> Iterator[tuple[object, object, object]]:
    """(planned tensor, Tensor, QuantStats | None) for every planned tensor, in plan order.
    `store(name, w, scheme)` stores the tensors outside the quantized projections."""
    method = layer_method(options, prune_targets, head_dim=args.head_dim)
    tokens = np.asarray(calib.tokens)
    device = best_device()
    items = calibrated_stream(ckpt, args, planned, tokens, method, store, progress=options.progress,
                              reports=reports, device=device)
    # a method may train over the whole finished stream (qat.py's E2E-QP)
    finish = getattr(method, "finish", None)
    return items if finish is None else finish(items, args, tokens, device, options.progress)


def summary_lines(reports: list[LayerReport]) -> list[str]:
    """Per-layer relative output errors of the quantized projections, and their mean."""
    if not reports:
        return []
    errs = [r.rel_err for rep in reports for r in rep.linears]
    lines = [rep.line() for rep in reports]
    lines.append(f"mean relative output error over {len(errs)} projections: {np.mean(errs):.3e}")
    return lines
