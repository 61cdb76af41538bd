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
from .outliers import KeepOptions, RtnKeepMethod
from .prune import PruneMethod, check_prune_options, parse_pattern
from .smoothquant import SmoothQuantMethod, describe as describe_smoothquant

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
    prune: str | None = None  # pruning pattern: "2:4", "4:8" or a fraction "50%" (prune.py)
    prune_method: str = "wanda"  # magnitude, wanda or sparsegpt
    outliers: float | None = None  # fraction of each projection's weights kept in 16 bits (outliers.py)
    outlier_threshold: float | None = None  # LLM.int8(): input channels with |x| >= this stay 16-bit
    smooth: float | None = None  # SmoothQuant α (smoothquant.py); None: no smoothing
    act_static: bool = False  # W8A8: one static activation scale per tensor, from calibration
    act_calib: str | None = None  # how the static scale is chosen: minmax (default), percentile, mse, kl

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
        if self.prune is not None:
            check_prune_options(self.method, self.prune, self.prune_method)
        self.keep.check()
        if self.prune is not None and self.keep.active:
            raise ValueError("--outliers/--outlier-threshold do not combine with --prune; use one or the other")
        if self.smoothquant and (self.prune is not None or self.keep.active):
            raise ValueError("--smooth/--act-static do not combine with --prune/--outliers/--outlier-threshold")

    @property
    def smoothquant(self) -> bool:
        """Whether the W8A8 calibration of smoothquant.py runs (smoothing or static scales)."""
        return self.smooth is not None or self.act_static

    @property
    def keep(self) -> KeepOptions:
        """What is kept in 16 bits beside the quantized weights (outliers.py)."""
        return KeepOptions(self.outliers, self.outlier_threshold)

    @property
    def calibrated(self) -> bool:
        """Whether calibration data is needed (a calibrated method, or a calibrated pruning)."""
        return (self.method != "rtn" or (self.prune is not None and self.prune_method != "magnitude")
                or self.keep.active or self.smoothquant)

    def describe_prune(self) -> str:
        """The pruning as appended to the provenance's method ("" without pruning)."""
        if self.prune is None:
            return ""
        return f"+prune({self.prune}, {self.prune_method}{self._rtn_calib()})"

    def describe(self) -> str:
        """The method as recorded in the file's provenance."""
        if self.method == "gptq":
            return (f"gptq(damp={self.damp}, block={self.block}, act_order={self.act_order}, "
                    f"calib={self.calib_name}, {self.samples}x{self.seqlen})" + self.describe_prune()
                    + self.describe_keep() + self.describe_smooth())
        if self.method == "awq":
            return (f"awq(grid={self.awq_grid}, clip_search=True, calib={self.calib_name}, {self.samples}x{self.seqlen})"
                    + self.describe_keep())
        return "rtn" + self.describe_prune() + self.describe_keep() + self.describe_smooth()

    def describe_smooth(self) -> str:
        """SmoothQuant / static activations as appended to the provenance's method."""
        if not self.smoothquant:
            return ""
        return describe_smoothquant(self.smooth, self.act_static, self.act_calib)[:-1] + self._rtn_calib() + ")"

    def describe_keep(self) -> str:
        """Outliers / 16-bit columns as appended to the provenance's method ("" without them)."""
        if not self.keep.active:
            return ""
        return f"+keep16({self.keep.describe()}{self._rtn_calib()})"

    def _rtn_calib(self) -> str:
        """The calibration data for a provenance suffix: named there when the base method (rtn)
        does not name it itself but some step used it."""
        return f", calib={self.calib_name}, {self.samples}x{self.seqlen}" if self.method == "rtn" and self.calibrated else ""

    @property
    def calib_name(self) -> str:
        return self.calib if self.calib in ("pydoc", "self", "mix") else f"file:{Path(self.calib).name}"


def make_method(options: CalibOptions, clip_search: bool = True, prune_targets: frozenset[str] = frozenset(),
                head_dim: int = 0):
    """The layerwise.LayerMethod for the options' method (with pruning: of the projections
    named in prune_targets, see prune.PruneMethod; with SmoothQuant, head_dim lets o_proj's
    scales fold into v_proj, see smoothquant.fold_attention_output)."""
    if options.smoothquant:  # weights by round-to-nearest, or by GPTQ after the smoothing
        inner = (GptqMethod(damp=options.damp, block=options.block, act_order=options.act_order,
                            clip_search=clip_search) if options.method == "gptq" else None)
        return SmoothQuantMethod(options.smooth, options.act_static, options.act_calib or "minmax", head_dim, inner)
    if options.prune is not None:
        return PruneMethod(parse_pattern(options.prune), options.prune_method, options.method, prune_targets,
                           damp=options.damp, block=options.block, clip_search=clip_search)
    if options.method == "gptq":
        return GptqMethod(damp=options.damp, block=options.block, act_order=options.act_order,
                          clip_search=clip_search, keep=options.keep)
    if options.method == "awq":
        return AwqMethod(grid=options.awq_grid, clip_search=clip_search, keep=options.keep)
    if options.keep.active:  # round-to-nearest, calibrated only to choose what stays in 16 bits
        return RtnKeepMethod(options.keep, clip_search)
    raise ValueError(f"method {options.method!r} is not a calibrated method")


def prepare(src: str | Path, options: CalibOptions, fingerprint: str | None = None) -> Calibration:
    """The calibration token matrix for a checkpoint folder (`fingerprint`: a hash of its files,
    which lets self-sampled windows be reused; see calibration.cached_self_sampled)."""
    return calibration_tokens(src, options.calib, options.samples, options.seqlen, options.seed,
                              fingerprint=fingerprint)


def stream(ckpt, args, planned: list, calib: Calibration, options: CalibOptions, store: Callable, *,
           clip_search: bool = True, progress: bool = True,
           reports: list[LayerReport] | None = None,
           prune_targets: frozenset[str] = frozenset()) -> Iterator[tuple[object, object, object]]:
    """(planned tensor, Tensor, QuantStats | None) for every planned tensor, in plan order.
    `store(name, w, scheme)` stores the tensors outside the quantized projections."""
    method = make_method(options, clip_search, prune_targets, head_dim=args.head_dim)
    return calibrated_stream(ckpt, args, planned, np.asarray(calib.tokens), method,
                             store, progress=progress, reports=reports)


def summary_lines(reports: list[LayerReport]) -> list[str]:
    """Per-layer relative output errors of the quantized projections, and their mean."""
    if not reports:
        return []
    errs = [r.rel_err for rep in reports for r in rep.linears]
    lines = [rep.line() for rep in reports]
    lines.append(f"mean relative output error over {len(errs)} projections: {np.mean(errs):.3e}")
    return lines
