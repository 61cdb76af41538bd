"""convert(): a local Hugging Face checkpoint to a .qbin file, by any method of convert/methods.py.

The jobs are split by module: options.py says what to do, plan.py which tensors to write in
which scheme and their exact sizes, calibrated.py and layerwise.py the calibrated methods,
report.py what was done; this module checks the inputs and writes the file. Streaming: tensors
are read one at a time from memory-mapped safetensors, quantized in row blocks and streamed to
the writer's scratch file, so peak memory stays near the largest tensor (for calibrated
methods, one decoder layer and the calibration activations).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from qformat.config import Provenance
from qformat.schemes import Scheme, Tensor, float_tensor
from qformat.writer import QbinWriter

from . import budgeted, calibrated
from .architectures import tensor_rules
from .checkpoint import Checkpoint, CheckpointError, LazyRows
from .gguf_import import import_gguf, is_gguf
from .hf_config import architecture_of, generation_defaults, model_args
from .hf_import import FORMATS as HF_FORMATS
from .hf_import import import_hf_quantized
from .hf_tokenizer import read_tokenizer
from .options import ConvertOptions
from .outliers import KeepTally
from .lora_merge import merge_lora
from .plan import ConvertError, plan, planned_sidecars, resolve_special, skipped
from .provenance import CONVERTER, SourceFiles, created_timestamp
from .prune import magnitude_store, parse_pattern, plan_pruning
from .report import ConvertReport, TensorReport
from .rtn import BLOCK_ELEMENTS, QuantStats, quantize_weight
from .smoothquant import with_activation

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


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

def convert(src: str | os.PathLike, dst: str | os.PathLike, scheme: str | None = None,
            options: ConvertOptions | None = None, **fields) -> ConvertReport:
    """Convert the HF checkpoint folder `src` (or a GGUF file: gguf_import.import_gguf) into the
    qbin file `dst`.

    options: a ConvertOptions (default: its defaults); `scheme` and keyword `fields` replace
    those fields of it, e.g. convert(src, dst, "int4-g64", method="gptq", calib="pydoc").
    Raises ConvertError (or the checkpoint/tokenizer's ValueError) with a one-line message.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if is_gguf(src):  # llama.cpp's format: imported as it is (gguf_import.py)
        requantize = scheme or fields.get("scheme") or (options.scheme if options is not None else None)
        return import_gguf(src, dst, requantize, force=fields.get("force", options.force if options else False))
    options = dataclasses.replace(options or ConvertOptions(), **({"scheme": scheme} if scheme else {}), **fields)
    try:
        options = options.validate()
    except ValueError as e:
        raise ConvertError(str(e)) from None
    _check_paths(src, dst, options)
    config = _read_json(src / "config.json")
    gen_path = src / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    arch = architecture_of(config)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        if method in HF_FORMATS:  # GPTQ, AWQ, compressed-tensors: imported as they are (hf_import.py)
            if options.scheme != ConvertOptions.scheme or options.calibrated or options.allocating:
                raise ConvertError(f"{src}: the checkpoint is already quantized ({method}); it is imported as "
                                   "it is, without a scheme or method: convert its unquantized release to requantize")
            return import_hf_quantized(src, dst, force=options.force, command=options.command)
        raise ConvertError(f"{src}: the checkpoint is quantized with {method!r}, which qformat does not read "
                           f"(it reads {', '.join(HF_FORMATS)}); convert its unquantized (bf16/fp16/fp32) release")
    ckpt = Checkpoint(src, allow_pickle=options.allow_pickle)
    args = model_args(config, gen, has_lm_head="lm_head.weight" in ckpt)
    if args.moe:
        _check_moe_options(src, options)
    if arch.norm_offset:
        ckpt.add_offset([hf for hf, _, role in tensor_rules(arch, args.n_layers) if role == "norm"], arch.norm_offset)
    try:
        for layer in range(args.n_layers):
            for fused, parts in arch.split_parts(args, layer):
                ckpt.split(fused, parts)
            for stacked, parts in arch.stack_parts(args, layer):
                ckpt.stack(stacked, parts)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    tok = read_tokenizer(src)
    # an allocation chooses the embeddings' and head's schemes itself: a tied head stays tied
    planned, args = plan(ckpt, args, arch, dataclasses.replace(options, head="scheme", embed="scheme")
                         if options.allocating else options)
    try:
        prune_targets = (plan_pruning(planned, options.prune, lambda p: skipped((p.name, p.hf_name), options.skip))
                         if options.prune else frozenset())
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if args.vocab_size < max((i for c in tok.info.selftest for i in c.ids), default=-1) + 1:
        raise ConvertError(f"{src}: the tokenizer produces ids beyond vocab_size {args.vocab_size}")
    head, embed = resolve_special(options.head, options.main), resolve_special(options.embed, options.main)
    report = ConvertReport(src, dst, options.main.name, args, [], tok.stored.nbytes, 0, 0.0, options.dry_run,
                           head=(embed if args.tie_embeddings else head).name, embed=embed.name,
                           clip_search=options.clip)
    if options.dry_run and not options.allocating:
        return _dry_run(report, planned, prune_targets, tok.stored.nbytes, options, started)

    merged = merge_lora(ckpt, options.merge_lora) if options.merge_lora is not None else {}
    sources = SourceFiles(src, [src / "config.json"] + ([gen_path] if gen else []) + ckpt.weight_files + tok.files,
                          merged)
    source_files = sources.sha256()
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
        command=options.command if options.command is not None else
        f"qformat.convert.convert({src.name!r}, {dst.name!r}, scheme={options.scheme!r}, head={options.head!r}, "
        f"embed={options.embed!r}, skip={list(options.skip)!r}, clip_search={options.clip}"
        + (f", target_bpw={options.target_bpw!r}, max_kl={options.max_kl!r}, candidates={options.candidates!r}"
           if options.allocating else "") + ")",
        scheme=options.main.name if not options.allocating else "allocated",
        method=options.describe() if calibration else options.describe_uncalibrated(),
        calibration_sha256=calibration.sha256 if calibration else None,
        created=created_timestamp(),
    )
    sens = None
    finish = dict(model=args, tokenizer=tok.info, chat_template=tok.chat_template,
                  generation=generation_defaults(gen))
    if options.allocating:
        planned, provenance, sens, planned_size = budgeted.allocate_plan(
            ckpt, args, planned, calibration, options, provenance, finish, tok.stored, report)
        report.scheme = provenance.scheme
        chosen = {p.role: p.scheme.name for p in planned if p.role in ("embed", "head")}
        report.embed = chosen.get("embed", report.embed)
        report.head = chosen.get("head", report.embed if args.tie_embeddings else report.head)
        if options.dry_run:
            report.tensors = [TensorReport(p.name, p.role, p.shape, p.scheme.name, p.nbytes(planned_sidecars(
                p, options, False))) for p in planned]
            report.file_size = planned_size
            report.seconds = time.perf_counter() - started
            ckpt.close()
            return report
    store_weight = budgeted.head_store(sens, options, store) if sens is not None else store
    layer_reports: list = []
    tally = KeepTally()
    with QbinWriter(dst, overwrite=options.force) as writer:
        if options.layerwise:
            tensors = calibrated.stream(ckpt, args, planned, calibration, options,
                                        lambda n, w, sc: store_weight(n, w, sc, clip_search=options.clip),
                                        reports=layer_reports, prune_targets=prune_targets)
        else:
            tensors = _round_to_nearest(ckpt, planned, prune_targets, options)
        for p, t, stats in tensors:
            t = with_activation(t, p.scheme)  # W8A8: inputs quantized at run time (spec §6.5)
            writer.add_tensor(t)
            report.tensors.append(TensorReport(p.name, p.role, p.shape, p.scheme.name, t.nbytes, stats))
            tally.add(p.role, t)
            del t
        writer.add_tensor(tok.stored)
        sources.check_unchanged()
        writer.finish(**finish, provenance=provenance)
    ckpt.close()
    if calibration is not None:
        report.notes.append(f"{options.describe()}; calibration {calibration.describe()}")
        report.notes.extend(calibrated.summary_lines(layer_reports))
        if options.keep.active:
            report.notes.append(tally.line())
    report.file_size = dst.stat().st_size
    if options.allocating and report.file_size != planned_size:  # the sizer and the writer disagree: a bug
        report.notes.append(f"warning: planned {planned_size} bytes, wrote {report.file_size}")
    report.seconds = time.perf_counter() - started
    return report


def _check_paths(src: Path, dst: Path, options: ConvertOptions) -> None:
    if not src.is_dir():
        raise ConvertError(f"{src}: no such model folder" if not src.exists() else f"{src}: not a folder")
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src}: config.json is missing; is this a Hugging Face model folder?")
    if options.dry_run:
        return
    if dst.is_dir():
        raise ConvertError(f"{dst}: is a folder; give the output file's path, e.g. {dst / 'model.qbin'}")
    if dst.exists() and not options.force:
        raise ConvertError(f"{dst}: already exists; pass --force to replace it")
    if not dst.parent.is_dir():
        raise ConvertError(f"{dst}: folder {dst.parent} does not exist")


def _dry_run(report: ConvertReport, planned: list, prune_targets: frozenset[str], tokenizer_bytes: int,
             options: ConvertOptions, started: float) -> ConvertReport:
    """The report of a conversion that reads and writes nothing: every tensor's exact bytes."""
    sidecars = {p.name: planned_sidecars(p, options, p.name in prune_targets) for p in planned}
    report.tensors = [TensorReport(p.name, p.role, p.shape, p.scheme.name, p.nbytes(sidecars[p.name]))
                      for p in planned]
    header_guess = 4096 + 400 * (len(planned) + 1)  # JSON directory entries are ~300-400 bytes
    report.file_size = header_guess + sum(p.aligned_nbytes(sidecars[p.name]) for p in planned) + tokenizer_bytes
    if options.outlier_threshold is not None:
        report.notes.append("LLM.int8() 16-bit columns depend on the calibration activations; "
                            "their bytes are not in this estimate")
    report.seconds = time.perf_counter() - started
    return report


def _check_moe_options(src: Path, options: ConvertOptions) -> None:
    """Refuse what a mixture of experts cannot take: per-tensor sidecars that differ between the
    experts quantized one by one (a permutation, 16-bit columns), and the calibrations that do
    not run expert by expert."""
    refused = [(options.allocating, "--target-bpw/--max-kl"), (options.prune is not None, "--prune"),
               (options.keep.active, "--outliers/--outlier-threshold"), (options.smoothquant, "--smooth/--act-static"),
               (options.method == "qat", "--method qat"),
               (options.method == "gptq" and options.gptq_act_order and not options.gptq_static_groups,
                "GPTQ act-order without static groups (a permutation per expert)")]
    for on, what in refused:
        if on:
            raise ConvertError(f"{src}: {what} does not handle mixtures of experts yet; use --method rtn, gptq "
                               "(with static groups) or awq")


def _round_to_nearest(ckpt: Checkpoint, planned: list, prune_targets: frozenset[str], options: ConvertOptions):
    """(planned tensor, Tensor, QuantStats | None) of an uncalibrated conversion, in plan order."""
    bar = _progress(planned, options.progress)
    for p in bar:
        if options.progress:
            bar.set_postfix_str(f"{p.name} -> {p.scheme.name}")
        with ckpt.rows(p.hf_name) as rows:
            if p.name in prune_targets:  # magnitude pruning needs no calibration
                t, stats = magnitude_store(p.name, rows[0:rows.shape[0]], parse_pattern(options.prune), p.scheme,
                                           clip_search=options.clip)
            else:
                t, stats = store(p.name, rows, p.scheme, clip_search=options.clip)
        yield p, t, stats
