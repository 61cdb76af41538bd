"""The converter's entry to calibrated methods: options, the method object, the tensor stream.

convert() calls `prepare` once (tokenizes / samples the calibration data) and then iterates
`stream`, which yields every planned tensor in file order like the plain RTN loop does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .awq import DEFAULT_GRID, AwqMethod
from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN, DEFAULT_SOURCE, Calibration, calibration_tokens
from .gptq import DEFAULT_BLOCK, DEFAULT_DAMP, GptqMethod
from .layerwise import LayerReport, calibrated_stream

METHODS = ("rtn", "gptq", "awq")


@dataclass(frozen=True)
class CalibOptions:
    """How a calibrated method is run. `calib`: "pydoc", "self", "mix" or a text file's path."""

    method: str = "rtn"
    calib: str = DEFAULT_SOURCE
    samples: int = DEFAULT_SAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = 0
    damp: float = DEFAULT_DAMP  # GPTQ: dampening, a fraction of the Hessian's mean diagonal
    block: int = DEFAULT_BLOCK  # GPTQ: lazy-update block (columns)
    act_order: bool = True  # GPTQ: visit columns by decreasing Hessian diagonal (stores `perm`)
    awq_grid: int = DEFAULT_GRID  # AWQ: number of α values tried in [0, 1)

    def check(self) -> None:
        """ValueError with one line naming the bad option."""
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.samples < 1 or self.seqlen < 2:
            raise ValueError(f"calibration needs >= 1 sample of >= 2 tokens (got {self.samples} x {self.seqlen})")
        if not 0 <= self.damp < 10:
            raise ValueError(f"GPTQ dampening {self.damp} out of range; use a fraction such as 0.01")
        if self.block < 1 or self.awq_grid < 1:
            raise ValueError("GPTQ block and AWQ grid must be positive")

    def describe(self) -> str:
        """The method as recorded in the file's provenance."""
        if self.method == "gptq":
            return (f"gptq(damp={self.damp}, block={self.block}, act_order={self.act_order}, "
                    f"calib={self.calib_name}, {self.samples}x{self.seqlen})")
        if self.method == "awq":
            return f"awq(grid={self.awq_grid}, clip_search=True, calib={self.calib_name}, {self.samples}x{self.seqlen})"
        return "rtn"

    @property
    def calib_name(self) -> str:
        return self.calib if self.calib in ("pydoc", "self", "mix") else f"file:{Path(self.calib).name}"


def make_method(options: CalibOptions, clip_search: bool = True):
    """The layerwise.LayerMethod for the options' method."""
    if options.method == "gptq":
        return GptqMethod(damp=options.damp, block=options.block, act_order=options.act_order,
                          clip_search=clip_search)
    if options.method == "awq":
        return AwqMethod(grid=options.awq_grid, clip_search=clip_search)
    raise ValueError(f"method {options.method!r} is not a calibrated method")


def prepare(src: str | Path, options: CalibOptions) -> Calibration:
    """The calibration token matrix for a checkpoint folder."""
    return calibration_tokens(src, options.calib, options.samples, options.seqlen, options.seed)


def stream(ckpt, args, planned: list, calib: Calibration, options: CalibOptions, store: Callable, *,
           clip_search: bool = True, progress: bool = True,
           reports: list[LayerReport] | None = None) -> Iterator[tuple[object, object, object]]:
    """(planned tensor, Tensor, QuantStats | None) for every planned tensor, in plan order.
    `store(name, w, scheme)` stores the tensors outside the quantized projections."""
    return calibrated_stream(ckpt, args, planned, np.asarray(calib.tokens), make_method(options, clip_search),
                             store, progress=progress, reports=reports)


def summary_lines(reports: list[LayerReport]) -> list[str]:
    """Per-layer relative output errors of the quantized projections, and their mean."""
    if not reports:
        return []
    errs = [r.rel_err for rep in reports for r in rep.linears]
    lines = [rep.line() for rep in reports]
    lines.append(f"mean relative output error over {len(errs)} projections: {np.mean(errs):.3e}")
    return lines
