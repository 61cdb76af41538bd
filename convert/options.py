"""Every option of a conversion, in one dataclass: what `qconvert` parses and `convert()` takes.

The CLI fills it from its flags (the flag names are the field names), applications construct it
or pass its fields as keywords to qformat.convert.convert; everything downstream (planning, the
calibrated methods, the provenance) reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from qformat.schemes import KINDS, Scheme, parse_scheme

from .allocate import parse_candidates
from .awq import DEFAULT_GRID
from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN, DEFAULT_SOURCE
from .gptq import DEFAULT_BLOCK, DEFAULT_DAMP
from .methods import METHODS, QAT_INITS
from .outliers import KeepOptions, parse_fraction
from .prune import check_prune_options
from .qat import E2E_LOSSES, QatOptions
from .sensitivity import SCORES
from .smoothquant import check_options as check_smoothquant, describe as describe_smoothquant

# Choices for the embeddings and the LM head: "auto" (plan.resolve_special), a fixed format, or
# "scheme" (the main scheme).
SPECIAL_CHOICES = ("auto", "f16", "int8", "scheme")


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert a checkpoint.

    scheme: the main scheme (qformat.schemes.parse_scheme). head/embed: SPECIAL_CHOICES for the
    LM head and the embeddings (plan.resolve_special). skip: fnmatch patterns of qbin or HF
    tensor names kept in f16. clip_search: search a clipping ratio per group; None takes the
    method's measured default (`clip`). force: replace an existing output. dry_run: plan and size
    only. allow_pickle: accept pytorch_model.bin (torch.load(weights_only=True)). progress: a
    progress bar on stderr. command: the command line recorded in the provenance.

    method: METHODS' rtn, gptq or awq; the calibrated ones read calib_samples x calib_seqlen
    tokens of `calib` ("pydoc", "self", "mix" or a text file; calibration.py); damp, block and
    act_order are GPTQ's dampening, lazy block and column order (act-order stores a `perm`, not
    with pruning); static_groups fixes GPTQ's groups in input order, so act-order stores no
    `perm` (the file then exports to GGUF and compressed-tensors exactly; None: wherever it
    combines, i.e. without pruning, outliers or 16-bit columns); awq_grid the α values AWQ tries.
    prune: "2:4", "4:8" or a fraction "50%" of every decoder projection, chosen by prune_method
    (magnitude, wanda, sparsegpt; None: the method's default).
    outliers: a fraction (0.005 or "0.5%") of every decoder projection's weights kept exactly
    in 16 bits; outlier_threshold: input channels whose calibration activations reach it keep
    their weight column in 16 bits (LLM.int8(), 6.0); both calibrate, also with rtn.
    smooth: SmoothQuant's α for scheme "w8a8"; act_static: one calibrated activation scale per
    tensor, chosen by act_calib (minmax, percentile, mse, kl) (smoothquant.py).
    target_bpw: bits per weight of the whole file; max_kl: a bound on the predicted KL to the
    unquantized model (nats per token). Either one makes the scheme of every projection, the
    embedding and the head a choice among `candidates` (allocate.py; comma-separated scheme
    names, None: allocate.DEFAULT_CANDIDATES), scored on sensitivity_samples calibration
    windows by `score` (sensitivity.SCORES); `scheme` is then unused.

    qat_*, e2e_*: method "qat" (qat.py): qat_init (QAT_INITS) quantizes each layer first, then
    Block-AP and E2E-QP train it (QatOptions' fields without the prefix; the seed is `seed`).
    """

    scheme: str = "int4-g64"
    head: str = "auto"
    embed: str = "auto"
    skip: tuple[str, ...] = ()
    clip_search: bool | None = None
    force: bool = False
    dry_run: bool = False
    allow_pickle: bool = False
    merge_lora: str | None = None  # a peft LoRA adapter folder merged into the float weights (lora_merge.py)
    progress: bool = True
    command: str | None = None
    method: str = "rtn"
    calib: str = DEFAULT_SOURCE
    calib_samples: int = DEFAULT_SAMPLES
    calib_seqlen: int = DEFAULT_SEQLEN
    seed: int = 0
    damp: float = DEFAULT_DAMP
    block: int = DEFAULT_BLOCK
    act_order: bool = True
    static_groups: bool | None = None
    awq_grid: int = DEFAULT_GRID
    prune: str | None = None
    prune_method: str | None = None
    outliers: float | str | None = None
    outlier_threshold: float | None = None
    smooth: float | None = None
    act_static: bool = False
    act_calib: str | None = None
    target_bpw: float | None = None
    max_kl: float | None = None
    candidates: str | None = None
    sensitivity_samples: int = 16
    score: str = "fisher"
    qat_init: str = "gptq"
    qat_epochs: int = QatOptions.epochs
    qat_lr: float = QatOptions.lr
    qat_weight_lr: float = QatOptions.weight_lr
    qat_samples: int | None = QatOptions.samples
    qat_batch: int = QatOptions.batch
    e2e_steps: int = QatOptions.e2e_steps
    e2e_lr: float = QatOptions.e2e_lr
    e2e_batch: int = QatOptions.e2e_batch
    e2e_loss: str = QatOptions.e2e_loss

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", tuple(self.skip))

    def validate(self) -> "ConvertOptions":
        """The options with the fraction parsed; ValueError with one line naming a bad value
        or combination."""
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.head not in SPECIAL_CHOICES or self.embed not in SPECIAL_CHOICES:
            bad = self.head if self.head not in SPECIAL_CHOICES else self.embed
            raise ValueError(f"embeddings/head choice {bad!r}; expected one of {', '.join(SPECIAL_CHOICES)}")
        main = parse_scheme(self.scheme)
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise ValueError(f"calibration needs >= 1 sample of >= 2 tokens (got {self.calib_samples} x "
                             f"{self.calib_seqlen})")
        if not 0 <= self.damp < 10:
            raise ValueError(f"GPTQ dampening {self.damp} out of range; use a fraction such as 0.01")
        if self.block < 1 or self.awq_grid < 1:
            raise ValueError("GPTQ block and AWQ grid must be positive")
        if self.prune is None and self.prune_method is not None:
            raise ValueError(f"prune method {self.prune_method!r} given without a pattern; add --prune 2:4 "
                             "(or 4:8, 50%)")
        if self.prune is not None:
            if not METHODS[self.method].prunes:
                raise ValueError(f"--prune does not combine with --method {self.method} (its scales are searched "
                                 "on the dense weights); use --method gptq (pruned and quantized jointly) or rtn")
            check_prune_options(self.prune, self.pruning)
        options = self if self.outliers is None else replace(self, outliers=parse_fraction(self.outliers))
        options.keep.check()
        if self.static_groups is True and (self.base_method != "gptq" or self.prune is not None or options.keep.active):
            raise ValueError("--static-groups is a GPTQ option that does not combine with --prune or --outliers")
        if self.prune is not None and options.keep.active:
            raise ValueError("--outliers/--outlier-threshold do not combine with --prune; use one or the other")
        if options.smoothquant and (self.prune is not None or options.keep.active):
            raise ValueError("--smooth/--act-static do not combine with --prune/--outliers/--outlier-threshold")
        if options.smoothquant and not METHODS[self.method].smooths:
            raise ValueError(f"--smooth/--act-static do not combine with --method {self.method} (both fold "
                             "scales into the norms); use --method rtn or gptq")
        check_smoothquant(self.smooth, self.act_static, self.act_calib, main)
        self._check_qat(options, main)
        if self.allocating:
            self._check_allocation(options)
        if options.keep.active and not main.quantized:
            raise ValueError(f"--outliers/--outlier-threshold keep weights beside a quantized part; "
                             f"{main.name} is not quantized (use e.g. int4-g64 or int8)")
        return options

    def _check_qat(self, options: "ConvertOptions", main: Scheme) -> None:
        qat_fields = {f: getattr(self, f) for f in ("qat_init", "qat_epochs", "qat_lr", "qat_weight_lr", "qat_samples",
                                                     "qat_batch", "e2e_steps", "e2e_lr", "e2e_batch", "e2e_loss")}
        if self.method != "qat":
            changed = [f for f, v in qat_fields.items() if v != getattr(ConvertOptions, f)]
            if changed:
                raise ValueError(f"--{changed[0].replace('_', '-')} is an option of --method qat")
            return
        if self.qat_init not in QAT_INITS:
            raise ValueError(f"--qat-init {self.qat_init!r}; expected one of {', '.join(QAT_INITS)}")
        if self.e2e_loss not in E2E_LOSSES:
            raise ValueError(f"--e2e-loss {self.e2e_loss!r}; expected one of {', '.join(E2E_LOSSES)}")
        if self.qat_epochs < 0 or self.e2e_steps < 0 or min(self.qat_batch, self.e2e_batch) < 1:
            raise ValueError("--qat-epochs and --e2e-steps must be >= 0, the batches >= 1")
        if min(self.qat_lr, self.qat_weight_lr, self.e2e_lr) < 0:
            raise ValueError("QAT learning rates must be >= 0")
        if self.qat_samples is not None and self.qat_samples < 1:
            raise ValueError("--qat-samples must be at least 1")
        if self.prune is not None or options.smoothquant:
            raise ValueError("--method qat trains dense weight-only grids; it does not combine with --prune, "
                             "--smooth or --act-static")
        if not self.allocating and (not main.quantized or KINDS[main.kind].nf4 or main.act_bits):
            raise ValueError(f"--method qat trains uniform integer grids; use int2..int8 schemes, not {main.name}")

    def _check_allocation(self, options: "ConvertOptions") -> None:
        if self.target_bpw is not None and self.max_kl is not None:
            raise ValueError("--target-bpw and --max-kl each choose the file size; give one of them")
        if self.target_bpw is not None and not 0 < self.target_bpw <= 32:
            raise ValueError(f"--target-bpw {self.target_bpw}: give bits per weight of the whole file, e.g. 4.0")
        if self.max_kl is not None and not self.max_kl > 0:
            raise ValueError(f"--max-kl {self.max_kl}: give a positive bound in nats per token, e.g. 0.05")
        if self.prune is not None or options.keep.active or options.smoothquant:
            raise ValueError("--target-bpw/--max-kl choose weight-only schemes; they do not combine with --prune, "
                             "--outliers, --outlier-threshold, --smooth or --act-static")
        if self.head != "auto" or self.embed != "auto":
            raise ValueError("--target-bpw/--max-kl choose the embeddings' and the head's schemes too; drop "
                             "--head/--embed (or keep a tensor in f16 with --skip)")
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r}; expected one of {', '.join(SCORES)}")
        if self.sensitivity_samples < 1:
            raise ValueError("--sensitivity-samples must be at least 1")
        parse_candidates(self.candidates)

    # -- derived ---------------------------------------------------------------
    @property
    def allocating(self) -> bool:
        """Whether the schemes are chosen per tensor for a budget (allocate.py)."""
        return self.target_bpw is not None or self.max_kl is not None

    @property
    def main(self) -> Scheme:
        return parse_scheme(self.scheme)

    @property
    def clip(self) -> bool:
        """Whether groups search a clipping ratio: clip_search, else the method's measured default.
        For plain RTN the weight-MSE search lowers weight error by 15-25% but raises perplexity
        (SmolLM2-135M, EVAL.md protocol, int8 embeddings/head): int4-g64 19.00 with it vs 18.32
        without, int4-g32 17.76 vs 17.22, int3-g128 88.6 vs 83.2: weight MSE ignores which weights
        the activations amplify. GPTQ and AWQ, which measure the layer output, gain from it
        (GPTQ int4-g64 15.05)."""
        return METHODS[self.method].clip_search if self.clip_search is None else self.clip_search

    @property
    def pruning(self) -> str:
        """The pruning method: prune_method, else the method's default."""
        return self.prune_method or METHODS[self.method].prune_method

    @property
    def gptq_act_order(self) -> bool:
        """GPTQ's act-order, which pruning turns off (its masks are chosen in column order)."""
        return self.act_order and self.prune is None

    @property
    def gptq_static_groups(self) -> bool:
        """GPTQ's static groups: as asked, else (None) wherever they combine. Measured on SmolLM2
        (README): better than a stored permutation on both corpora, at int4-g64 and at a budget."""
        if self.static_groups is not None:
            return self.static_groups
        return self.base_method == "gptq" and self.gptq_act_order and not self.keep.active

    @property
    def base_method(self) -> str:
        """The post-training method that rounds the weights: method, or qat's init."""
        return self.qat_init if self.method == "qat" else self.method

    @property
    def qat(self) -> QatOptions:
        """Method qat's training options."""
        return QatOptions(self.qat_epochs, self.qat_lr, self.qat_weight_lr, self.qat_samples, self.qat_batch,
                          self.e2e_steps, self.e2e_lr, self.e2e_batch, self.seed, self.e2e_loss)

    @property
    def keep(self) -> KeepOptions:
        """What is kept in 16 bits beside the quantized weights (outliers.py)."""
        return KeepOptions(self.outliers, self.outlier_threshold)

    @property
    def smoothquant(self) -> bool:
        """Whether the W8A8 calibration of smoothquant.py runs (smoothing or static scales)."""
        return self.smooth is not None or self.act_static

    @property
    def layerwise(self) -> bool:
        """Whether the decoder layers are quantized layer by layer on calibration activations (a
        calibrated method, a calibrated pruning, 16-bit weights, SmoothQuant): layerwise.py."""
        return (METHODS[self.method].calibrated or (self.prune is not None and self.pruning != "magnitude")
                or self.keep.active or self.smoothquant)

    @property
    def calibrated(self) -> bool:
        """Whether calibration data is needed (layerwise, or to measure an allocation)."""
        return self.layerwise or self.allocating

    @property
    def calib_name(self) -> str:
        return self.calib if self.calib in ("pydoc", "self", "mix") else f"file:{Path(self.calib).name}"

    # -- provenance ------------------------------------------------------------
    def describe(self) -> str:
        """The method as the file's provenance records it."""
        return (METHODS[self.method].describe(self) + self.describe_prune() + self.describe_keep()
                + self.describe_smooth() + self.describe_allocation())

    def describe_allocation(self) -> str:
        """The per-tensor allocation as appended to the provenance's method ("" without it)."""
        if not self.allocating:
            return ""
        target = f"bpw={self.target_bpw}" if self.target_bpw is not None else f"max_kl={self.max_kl}"
        samples = min(self.sensitivity_samples, self.calib_samples)
        return f"+allocate({target}, score={self.score}, samples={samples}{self._calib_suffix()})"

    def describe_uncalibrated(self) -> str:
        """describe() of a conversion that read no calibration data: round-to-nearest, its clip
        search, magnitude pruning."""
        return "rtn" + ("+clip-search" if self.clip else "") + self.describe_prune()

    def describe_prune(self) -> str:
        """The pruning as appended to the provenance's method ("" without pruning)."""
        return "" if self.prune is None else f"+prune({self.prune}, {self.pruning}{self._calib_suffix()})"

    def describe_keep(self) -> str:
        """Outliers / 16-bit columns as appended to the provenance's method ("" without them)."""
        return "" if not self.keep.active else f"+keep16({self.keep.describe()}{self._calib_suffix()})"

    def describe_smooth(self) -> str:
        """SmoothQuant / static activations as appended to the provenance's method."""
        if not self.smoothquant:
            return ""
        return describe_smoothquant(self.smooth, self.act_static, self.act_calib)[:-1] + self._calib_suffix() + ")"

    def _calib_suffix(self) -> str:
        """The calibration data for a provenance suffix: named there when the method does not
        name it itself but some step used it."""
        if METHODS[self.method].names_calibration or not self.calibrated:
            return ""
        return f", calib={self.calib_name}, {self.calib_samples}x{self.calib_seqlen}"


__all__ = ["ConvertOptions", "SPECIAL_CHOICES"]
