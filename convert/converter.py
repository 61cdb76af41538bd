"""convert(): a local Hugging Face checkpoint to a .qbin file with a round-to-nearest scheme.

Streaming: tensors are read one at a time from memory-mapped safetensors, quantized in row
blocks and streamed to the writer's scratch file, so peak memory stays near the largest tensor.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

import qformat
from qformat.config import ModelArgs, Provenance
from qformat.constants import ALIGNMENT
from qformat.packing import row_nbytes
from qformat.schemes import KINDS, Scheme, Tensor, float_tensor, parse_scheme
from qformat.writer import QbinWriter

from .architectures import IGNORED_HF_TENSORS, Architecture, tensor_rules
from .checkpoint import Checkpoint, LazyRows
from .hf_config import architecture_of, generation_defaults, model_args
from .hf_tokenizer import read_tokenizer
from . import calibrated
from .outliers import KeepTally, outlier_count, parse_fraction
from .prune import default_prune_method, magnitude_store, parse_pattern, plan_pruning
from .rtn import BLOCK_ELEMENTS, QuantStats, quantize_weight
from .smoothquant import check_options as check_smoothquant, with_activation

CONVERTER = f"qformat.convert {qformat.__version__}"

# Choices for the embeddings and the LM head: "auto" (see resolve_special), a fixed format,
# or "scheme" (the main scheme).
SPECIAL_CHOICES = ("auto", "f16", "int8", "scheme")


class ConvertError(ValueError):
    """A conversion request that cannot be carried out; the message is one line with the fix."""


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor to write: where it comes from, its qbin name, role, shape and target scheme."""

    hf_name: str
    name: str
    role: str  # embed, head, linear, norm, bias
    shape: tuple[int, ...]
    scheme: Scheme

    def nbytes(self, sidecars: SidecarPlan | None = None) -> int:
        """Bytes of the stored arrays (with the sidecars a conversion would add, when given)."""
        return sum(array_sizes(self.shape, self.scheme, sidecars))

    def aligned_nbytes(self, sidecars: SidecarPlan | None = None) -> int:
        """Bytes the arrays take in the file, each padded to the file's alignment."""
        return sum(-(-n // ALIGNMENT) * ALIGNMENT for n in array_sizes(self.shape, self.scheme, sidecars))


@dataclass(frozen=True)
class SidecarPlan:
    """What a conversion adds to a quantized projection beyond codes, scales and zeros, as far
    as it is known before calibration: n:m compression, act-order permutation, the outlier
    budget. (LLM.int8() columns depend on the calibration activations and are not estimated.)"""

    nm: tuple[int, int] | None = None
    perm: bool = False
    outliers: float | None = None


def array_sizes(shape: tuple[int, ...], scheme: Scheme, sidecars: SidecarPlan | None = None) -> list[int]:
    """Byte sizes of the arrays a tensor of `shape` takes in `scheme` (codes, scales, zeros, and
    the sidecars of spec §6 that `sidecars` plans)."""
    if not scheme.quantized:
        return [int(np.prod(shape)) * scheme.bits // 8]
    rows, k = shape
    group = scheme.group_for(k)
    n_groups = -(-k // group)
    side = sidecars or SidecarPlan()
    bits = KINDS[scheme.kind].bits
    if side.nm:  # §6.3: n of every m codes, in groups of G·n/m, plus their positions
        n, m = side.nm
        kept = k * n // m
        codes = [rows * row_nbytes(kept, group * n // m, bits), rows * -(-kept * (2 if m == 4 else 4) // 8)]
    else:
        codes = [rows * row_nbytes(k, group, bits)]
    sizes = codes + [rows * n_groups * 2] + ([] if scheme.symmetric else [rows * n_groups])
    if side.perm:
        sizes.append(4 * k)
    count = outlier_count(rows * k, side.outliers)
    if count:  # §6.2: i32 row pointers, u16 (or i32) columns, f16 values
        sizes += [4 * (rows + 1), count * (2 if k <= 1 << 16 else 4), 2 * count]
    return sizes


@dataclass
class TensorReport:
    name: str
    role: str
    shape: tuple[int, ...]
    scheme: str  # scheme name the tensor is stored in
    nbytes: int
    stats: QuantStats | None = None  # None for norms, biases and dry runs

    @property
    def n(self) -> int:
        return int(np.prod(self.shape))

    @property
    def size_class(self) -> str:
        if self.role in ("norm", "bias"):
            return "norms+biases"
        if self.role == "embed":
            return "embeddings"
        if self.role == "head":
            return "head"
        return "attention" if ".attn." in self.name else "ffn"


@dataclass
class ConvertReport:
    """What a conversion did (or, for a dry run, would do)."""

    src: Path
    dst: Path
    scheme: str
    model: ModelArgs
    tensors: list[TensorReport]
    tokenizer_nbytes: int
    file_size: int  # bytes of the written file; for a dry run, the estimate
    seconds: float
    dry_run: bool
    head: str  # scheme of the LM head (tok_embeddings' when tied)
    embed: str
    clip_search: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(t.n for t in self.tensors if not (t.role == "head" and self.model.tie_embeddings))

    @property
    def weight_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        """Bits per weight over every stored number (scales, zeros, norms included)."""
        return 8 * self.weight_nbytes / max(self.n_params, 1)

    @property
    def linear_bpw(self) -> float:
        """Bits per weight of the transformer blocks' projections: the scheme's effective rate."""
        lin = [t for t in self.tensors if t.role == "linear"]
        return 8 * sum(t.nbytes for t in lin) / max(sum(t.n for t in lin), 1)

    def class_sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.size_class] = out.get(t.size_class, 0) + t.nbytes
        out["tokenizer"] = self.tokenizer_nbytes
        return out

    def rel_mse(self, roles: Iterable[str] = ("linear",), minmax: bool = False) -> float | None:
        """Error energy / weight energy summed over tensors of the given roles."""
        stats = [t.stats for t in self.tensors if t.role in roles and t.stats is not None]
        if not stats:
            return None
        w = sum(s.sq_weight for s in stats)
        e = sum(s.sq_err_minmax if minmax else s.sq_err for s in stats)
        return e / w if w > 0 else 0.0

    def summary(self) -> str:
        """A few human-readable lines: time, size, bits per weight, sizes per class, errors."""
        verb = "would write" if self.dry_run else "wrote"
        approx = "about " if self.dry_run else ""
        lines = [
            f"{verb} {self.dst} ({self.scheme}; embeddings {self.embed}, head {self.head}"
            f"{', tied' if self.model.tie_embeddings else ''}) in {self.seconds:.1f} s: "
            f"{approx}{self.file_size / 1e6:.2f} MB, {self.n_params / 1e6:.2f} M weights, "
            f"{self.bpw:.3f} bits/weight overall, {self.linear_bpw:.3f} in the projections",
            "sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in self.class_sizes().items()),
        ]
        for roles, label in ((("linear",), "projections"), (("embed", "head"), "embeddings/head")):
            clip = self.rel_mse(roles)
            if clip is None:
                continue
            plain = self.rel_mse(roles, minmax=True)
            if self.clip_search:
                lines.append(f"weight rel-MSE ({label}): min/max {plain:.3e}, clip-searched {clip:.3e} "
                             f"({100 * (1 - clip / plain) if plain else 0.0:.1f}% lower)")
            else:
                lines.append(f"weight rel-MSE ({label}): {clip:.3e} (min/max, no clip search)")
        lines.extend(self.notes)
        return "\n".join(lines)

    def plan_lines(self) -> list[str]:
        """One line per tensor: name, shape, stored scheme, bytes (the dry run's plan)."""
        return [f"{t.name:32s} {'x'.join(map(str, t.shape)):>12s}  {t.scheme:12s} {t.nbytes:>12d} B"
                for t in self.tensors]


# ---------------------------------------------------------------------------- planning

def planned_sidecars(p: PlannedTensor, pattern, options: calibrated.CalibOptions, perm: bool) -> SidecarPlan | None:
    """The sidecars a conversion with these options gives planned tensor p (the dry run's estimate):
    pattern is p's pruning Pattern or False; perm: GPTQ act-order."""
    if p.role != "linear" or not p.scheme.quantized:
        return None  # float tensors store pruned zeros densely; embeddings and head get no sidecars
    nm = (pattern.n, pattern.m) if pattern and pattern.structured else None
    return SidecarPlan(nm=nm, perm=perm, outliers=options.outliers)


def resolve_special(choice: str, main: Scheme) -> Scheme:
    """The scheme for the embeddings or the LM head.

    "auto" keeps them in the main scheme when it has 8 bits or more (f16, bf16, int8) and uses
    int8 per channel below that (w8a8 included: the head keeps float inputs, as SmoothQuant's
    reference leaves the head unquantized). Measured on SmolLM2-135M (tied; the embedding matrix is a fifth
    of the weights) at int4-g64 with bench/bench_convert.py, EVAL.md perplexity (reference
    14.00): embeddings/head in int4-g64 give 23.40 (77 MB), in int8 19.00 (90 MB), in f16
    18.86 (118 MB): int8 recovers 97% of what 16 bits would, for a third of its extra bytes.
    """
    if choice not in SPECIAL_CHOICES:
        raise ConvertError(f"embeddings/head choice {choice!r}; expected one of {', '.join(SPECIAL_CHOICES)}")
    if choice == "scheme":
        return main
    if choice == "f16":
        return parse_scheme("f16")
    if choice == "int8":
        return parse_scheme("int8")
    if not main.quantized or (main.bits >= 8 and not main.act_bits):
        return main
    return parse_scheme("int8")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def expected_shape(name: str, args: ModelArgs) -> tuple[int, ...]:
    """The shape the tensor-name contract gives `name` under `args`."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
    table = {
        "tok_embeddings": (args.vocab_size, args.dim), "output": (args.vocab_size, args.dim),
        "norm": (args.dim,), "attn_norm": (args.dim,), "ffn_norm": (args.dim,),
        "attn.wq": (q, args.dim), "attn.wk": (kv, args.dim), "attn.wv": (kv, args.dim),
        "attn.wo": (args.dim, q), "attn.bq": (q,), "attn.bk": (kv,), "attn.bv": (kv,),
        "attn.q_norm": (args.head_dim,), "attn.k_norm": (args.head_dim,),
        "ffn.w1": (args.ffn_dim, args.dim), "ffn.w3": (args.ffn_dim, args.dim), "ffn.w2": (args.dim, args.ffn_dim),
    }
    return table[suffix]


def _skipped(names: tuple[str, str], patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def plan(ckpt: Checkpoint, args: ModelArgs, arch: Architecture, main: Scheme, head: Scheme,
         embed: Scheme, skip: tuple[str, ...]) -> tuple[list[PlannedTensor], ModelArgs]:
    """Every tensor to write, in file order, and ModelArgs adjusted for a split tied head."""
    rules = tensor_rules(arch, args.n_layers)
    mapped = {hf for hf, _, _ in rules}
    for name in ckpt.names():
        if name not in mapped and not any(p.match(name) for p in IGNORED_HF_TENSORS):
            raise ConvertError(f"{ckpt.folder}: tensor {name} has no place in a {arch.hf_name} qbin "
                               "(a variant this converter does not support)")
    split_head = args.tie_embeddings and head != embed
    if split_head:
        args = dataclasses.replace(args, tie_embeddings=False)
    f16, f32 = parse_scheme("f16"), parse_scheme("f32")
    out = []
    for hf, name, role in rules:
        if role == "head":
            if split_head:
                hf = "model.embed_tokens.weight"
            elif args.tie_embeddings:
                continue
        if hf not in ckpt:
            raise ConvertError(f"{ckpt.folder}: tensor {hf} is missing from the checkpoint")
        shape = ckpt.shape(hf)
        want = expected_shape(name, args)
        if shape != want:
            raise ConvertError(f"{ckpt.folder}: tensor {hf} has shape {list(shape)}, config.json implies {list(want)}")
        if role in ("norm", "bias"):
            target = f32
        elif _skipped((name, hf), skip):
            target = f16
        else:
            target = {"embed": embed, "head": head}.get(role, main)
        out.append(PlannedTensor(hf, name, role, shape, target))
    return out, args


# ---------------------------------------------------------------------------- provenance

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def created_timestamp() -> str:
    """UTC ISO 8601 now, or SOURCE_DATE_EPOCH when set (reproducible builds convention)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            when = datetime.fromtimestamp(int(epoch), tz=timezone.utc)
        except ValueError:
            raise ConvertError(f"SOURCE_DATE_EPOCH={epoch!r} is not an integer number of seconds") from None
    else:
        when = datetime.now(timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------- storing

def store(name: str, w: np.ndarray | LazyRows, scheme: Scheme, *, clip_search: bool) -> tuple[Tensor, QuantStats | None]:
    """One tensor in its target scheme, and its quantization error (None for f32 norms/biases).

    w: the weight, or a LazyRows; either way large tensors are processed in row blocks.
    """
    if scheme.quantized:
        return quantize_weight(name, w, scheme, clip_search=clip_search)
    if scheme.kind == "f32" or len(w.shape) == 1:
        return float_tensor(name, np.asarray(w[0:w.shape[0]], dtype=np.float32), scheme.kind), None
    rows = w.shape[0]
    step = max(1, BLOCK_ELEMENTS // max(w.shape[1], 1))
    data = None
    sq_w = sq_err = 0.0
    for start in range(0, rows, step):
        block = np.asarray(w[start:start + step], dtype=np.float32)
        t = float_tensor(name, block, scheme.kind)
        if data is None:
            data = np.empty((rows, *block.shape[1:]), t.arrays["data"].dtype)
        data[start:start + block.shape[0]] = t.arrays["data"]
        err = t.dequantize() - block
        sq_err += float(np.square(err, dtype=np.float64).sum())
        sq_w += float(np.square(block, dtype=np.float64).sum())
    return Tensor(name, scheme.kind, tuple(w.shape), {"data": data}), QuantStats(rows * w.shape[1], sq_w, sq_err, sq_err)


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit="tensor", file=sys.stderr, dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------------------- convert

def default_clip_search(method: str) -> bool:
    """Whether a method searches clipping ratios by default, as measured on SmolLM2-135M.

    For plain RTN the weight-MSE search lowers weight error by 15-25% but raises perplexity
    (EVAL.md protocol, int8 embeddings/head): int4-g64 19.00 with it vs 18.32 without, int4-g32
    17.76 vs 17.22, int3-g128 88.6 vs 83.2. Weight MSE ignores which weights the activations
    amplify. GPTQ and AWQ, which measure the layer output, gain from it (GPTQ int4-g64 15.05).
    """
    return method != "rtn"


def convert(src: str | os.PathLike, dst: str | os.PathLike, scheme: str, *, head: str = "auto",
            embed: str = "auto", skip: Iterable[str] = (), clip_search: bool | None = None,
            force: bool = False, dry_run: bool = False, allow_pickle: bool = False, progress: bool = True,
            command: str | None = None, method: str = "rtn", calib: str = calibrated.DEFAULT_SOURCE,
            calib_samples: int = calibrated.DEFAULT_SAMPLES, calib_seqlen: int = calibrated.DEFAULT_SEQLEN,
            damp: float = calibrated.DEFAULT_DAMP, act_order: bool = True, prune: str | None = None,
            prune_method: str | None = None, outliers: float | str | None = None,
            outlier_threshold: float | None = None, smooth: float | None = None, act_static: bool = False,
            act_calib: str | None = None) -> ConvertReport:
    """Convert the HF checkpoint folder `src` into the qbin file `dst` with `scheme`.

    head/embed: "auto", "f16", "int8" or "scheme" (see resolve_special). skip: fnmatch patterns
    of qbin or HF tensor names kept in f16. clip_search: search a clipping ratio per group
    minimizing the weight MSE; None picks the measured default of the method (see
    default_clip_search).
    force: replace an existing dst. dry_run: plan and size only, nothing read or written
    beyond headers. allow_pickle: accept pytorch_model.bin (loaded with weights_only=True).
    command: the command line recorded in the provenance (the CLI passes sys.argv).
    method: "rtn", "gptq" or "awq"; the calibrated ones read `calib_samples` x `calib_seqlen`
    tokens of `calib` ("pydoc", "self", "mix" or a text file; see convert/calibration.py);
    damp and act_order are GPTQ's dampening and column order (act-order stores a `perm`).
    prune: "2:4", "4:8" or a fraction "50%" of every decoder projection, chosen by prune_method
    "magnitude", "wanda" or "sparsegpt" (None: prune.default_prune_method); act-order is then
    not used (see convert/prune.py).
    outliers: a fraction (0.005 or "0.5%") of every decoder projection's weights kept exactly in
    16 bits in a sparse sidecar, chosen by their effect on the layer output; outlier_threshold:
    input channels whose calibration activations reach it in magnitude keep their weight column
    in 16 bits (LLM.int8(), 6.0). Either makes rtn run layer by layer on the calibration data
    (see convert/outliers.py).
    smooth: SmoothQuant's α for scheme "w8a8" (int8 weights and activations), folded into the
    norms; act_static: store one calibrated activation scale per tensor (else per-token scales at
    run time), chosen by act_calib "minmax", "percentile", "mse" or "kl" (convert/smoothquant.py).
    Raises ConvertError (or the checkpoint/tokenizer's ValueError) with a one-line message.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    skip = tuple(skip)
    if clip_search is None:
        clip_search = default_clip_search(method)
    if prune is None and prune_method is not None:
        raise ConvertError(f"prune method {prune_method!r} given without a pattern; add --prune 2:4 (or 4:8, 50%)")
    options = calibrated.CalibOptions(method, calib, calib_samples, calib_seqlen, damp=damp,
                                      act_order=act_order and prune is None, prune=prune,
                                      prune_method=prune_method or default_prune_method(method))
    try:
        options = dataclasses.replace(options, outliers=None if outliers is None else parse_fraction(outliers),
                                      outlier_threshold=outlier_threshold, smooth=smooth, act_static=act_static,
                                      act_calib=act_calib)
        options.check()
        main = parse_scheme(scheme)
        check_smoothquant(smooth, act_static, act_calib, main, method)
        if options.keep.active and not main.quantized:
            raise ValueError(f"--outliers/--outlier-threshold keep weights beside a quantized part; "
                             f"{main.name} is not quantized (use e.g. int4-g64 or int8)")
    except ValueError as e:
        raise ConvertError(str(e)) from None
    head_scheme, embed_scheme = resolve_special(head, main), resolve_special(embed, main)
    if not src.is_dir():
        raise ConvertError(f"{src}: no such model folder" if not src.exists() else f"{src}: not a folder")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{src}: config.json is missing; is this a Hugging Face model folder?")
    if not dry_run:
        if dst.is_dir():
            raise ConvertError(f"{dst}: is a folder; give the output file's path, e.g. {dst / 'model.qbin'}")
        if dst.exists() and not force:
            raise ConvertError(f"{dst}: already exists; pass --force to replace it")
        if not dst.parent.is_dir():
            raise ConvertError(f"{dst}: folder {dst.parent} does not exist")
    config = _read_json(config_path)
    gen_path = src / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    arch = architecture_of(config)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ConvertError(f"{src}: the checkpoint is already quantized ({method}); convert its "
                           "unquantized (bf16/fp16/fp32) release instead")
    ckpt = Checkpoint(src, allow_pickle=allow_pickle)
    args = model_args(config, gen, has_lm_head="lm_head.weight" in ckpt)
    tok = read_tokenizer(src)
    planned, args = plan(ckpt, args, arch, main, head_scheme, embed_scheme, skip)
    try:
        prune_targets = plan_pruning(planned, prune, lambda p: _skipped((p.name, p.hf_name), skip)) if prune else frozenset()
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if args.vocab_size < max((i for c in tok.info.selftest for i in c.ids), default=-1) + 1:
        raise ConvertError(f"{src}: the tokenizer produces ids beyond vocab_size {args.vocab_size}")
    report = ConvertReport(src, dst, main.name, args, [], len(tok.data), 0, 0.0, dry_run,
                           head=head_scheme.name if not args.tie_embeddings else embed_scheme.name,
                           embed=embed_scheme.name, clip_search=clip_search)
    if dry_run:
        sidecars = {p.name: planned_sidecars(p, p.name in prune_targets and parse_pattern(prune), options,
                                             method == "gptq" and act_order and prune is None) for p in planned}
        report.tensors = [TensorReport(p.name, p.role, p.shape, p.scheme.name, p.nbytes(sidecars[p.name]))
                          for p in planned]
        header_guess = 4096 + 400 * (len(planned) + 1)  # JSON directory entries are ~300-400 bytes
        report.file_size = (header_guess + sum(p.aligned_nbytes(sidecars[p.name]) for p in planned)
                            + len(tok.data))
        if options.outlier_threshold is not None:
            report.notes.append("LLM.int8() 16-bit columns depend on the calibration activations; "
                                "their bytes are not in this estimate")
        report.seconds = time.perf_counter() - started
        return report

    files = [config_path] + ([gen_path] if gen else []) + ckpt.weight_files + tok.files
    source_files = {str(p.relative_to(src)): _sha256(p) for p in sorted(set(files))}
    calibration = None
    if options.calibrated:
        try:
            fingerprint = hashlib.sha256(json.dumps(source_files, sort_keys=True).encode()).hexdigest()
            calibration = calibrated.prepare(src, options, fingerprint)
        except ValueError as e:
            raise ConvertError(str(e)) from None
    provenance = Provenance(
        source=src.resolve().name,
        source_files=source_files,
        converter=CONVERTER,
        command=command if command is not None else
        f"qformat.convert.convert({src.name!r}, {dst.name!r}, scheme={main.name!r}, head={head!r}, "
        f"embed={embed!r}, skip={list(skip)!r}, clip_search={clip_search})",
        scheme=main.name,
        method=options.describe() if calibration else "rtn" + ("+clip-search" if clip_search else "") + options.describe_prune(),
        calibration_sha256=calibration.sha256 if calibration else None,
        created=created_timestamp(),
    )
    layer_reports: list = []
    tally = KeepTally()
    with QbinWriter(dst, overwrite=force) as writer:
        if calibration is not None:
            for p, t, stats in calibrated.stream(ckpt, args, planned, calibration, options,
                                                 lambda n, w, sc: store(n, w, sc, clip_search=clip_search),
                                                 clip_search=clip_search, progress=progress, reports=layer_reports,
                                                 prune_targets=prune_targets):
                t = with_activation(t, p.scheme)  # W8A8: inputs quantized at run time (spec §6.5)
                writer.add_tensor(t)
                report.tensors.append(TensorReport(p.name, p.role, p.shape, p.scheme.name, t.nbytes, stats))
                tally.add(p.role, t)
        else:
            bar = _progress(planned, progress)
            for p in bar:
                if progress:
                    bar.set_postfix_str(f"{p.name} -> {p.scheme.name}")
                with ckpt.rows(p.hf_name) as rows:
                    if p.name in prune_targets:  # magnitude pruning needs no calibration
                        t, stats = magnitude_store(p.name, rows[0:rows.shape[0]], parse_pattern(prune), p.scheme,
                                                   clip_search=clip_search)
                    else:
                        t, stats = store(p.name, rows, p.scheme, clip_search=clip_search)
                t = with_activation(t, p.scheme)  # W8A8: inputs quantized at run time (spec §6.5)
                writer.add_tensor(t)
                report.tensors.append(TensorReport(p.name, p.role, p.shape, p.scheme.name, t.nbytes, stats))
                del t
        writer.add_bytes(tok.info.tensor, tok.data)
        writer.finish(model=args, tokenizer=tok.info, chat_template=tok.chat_template,
                      generation=generation_defaults(gen), provenance=provenance)
    ckpt.close()
    if calibration is not None:
        report.notes.append(f"{options.describe()}; calibration {calibration.describe()}")
        report.notes.extend(calibrated.summary_lines(layer_reports))
        if options.keep.active:
            report.notes.append(tally.line())
    report.file_size = dst.stat().st_size
    report.seconds = time.perf_counter() - started
    return report
