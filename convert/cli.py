"""qconvert: the command line over qformat.convert.convert(). It parses, validates and calls."""
from __future__ import annotations

import errno
import shlex
import sys
from pathlib import Path

import click

from qformat.schemes import SCHEME_NAMES, parse_scheme

from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN, DEFAULT_SOURCE
from .converter import convert
from .gguf_export import export_gguf
from .gguf_import import import_gguf, is_gguf
from .gptq import DEFAULT_DAMP
from .hf_export import LAYOUTS, export_hf
from .hf_import import FORMATS as HF_FORMATS
from .hf_import import import_hf_quantized, quant_method
from .methods import METHODS, QAT_INITS
from .options import SPECIAL_CHOICES, ConvertOptions
from .outliers import parse_fraction
from .prune import PRUNE_METHODS, parse_pattern
from .qat import E2E_LOSSES, QatOptions


class OneLineCommand(click.Command):
    """A click command whose every error is one line on stderr with exit code 2, never a usage
    block or a traceback (library errors are turned into ClickException by the callback)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(args) if args is not None else sys.argv[1:]
        if self is main and argv[:1] == ["export"]:  # `qconvert export FILE.qbin --to gguf OUT`
            return export.main(argv[1:], "qconvert export", complete_var, standalone_mode, **extra)
        extra.setdefault("obj", {"argv": ["qconvert", *argv]})  # as a user would retype it
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            message = " ".join(e.format_message().split("\n"))
            click.echo(f"Error: {message}", err=True)
            if standalone_mode:
                sys.exit(2)
            raise
        except click.Abort as e:  # click's form of Ctrl-C: 130 as a shell reports SIGINT
            click.echo("Aborted.", err=True)
            if standalone_mode:
                sys.exit(130 if isinstance(e.__context__, KeyboardInterrupt) else 1)
            raise
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


class InputError(click.ClickException):
    """Bad input found by the library (missing folder, unsupported architecture, ...)."""

    exit_code = 2


def _check_scheme(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_scheme(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value


def _check_prune(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return None if value is None else parse_pattern(value).text
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def _check_outliers(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    try:
        return None if value is None else parse_fraction(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


SPECIAL_HELP = (
    "f16 or int8: that format; scheme: the main scheme; auto: the main scheme when it has 8 bits "
    "or more, else int8 per channel. Why: on SmolLM2-135M at int4-g64 (bench/bench_convert.py, "
    "EVAL.md perplexity, reference 14.00) embeddings/head in int4-g64 give 23.40, in int8 19.00, "
    "in f16 18.86, for files of 77, 90 and 118 MB."
)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", metavar="MODEL", type=click.Path(path_type=str))
@click.argument("dst", metavar="OUT.qbin", type=click.Path(path_type=str))
@click.option("--scheme", "-s", default=None, callback=_check_scheme,
              help=f"Quantization scheme: {', '.join(SCHEME_NAMES)}; int2/3/4 are asymmetric unless "
                   "suffixed -sym; groups run along the input dimension and need not divide it; a -dq suffix "
                   "(int4-g64-dq) stores 8-bit log-coded scales instead of float16 (spec §4.3).")
@click.option("--head", type=click.Choice(SPECIAL_CHOICES), default="auto", show_default=True,
              help="Format of the LM head. " + SPECIAL_HELP)
@click.option("--embed", type=click.Choice(SPECIAL_CHOICES), default="auto", show_default=True,
              help="Format of the token embeddings (same choices). A tied head follows the "
                   "embeddings unless --head differs, then it is stored separately.")
@click.option("--skip", multiple=True, metavar="PATTERN",
              help="Keep tensors whose qbin or HF name matches this glob in f16 (repeatable), "
                   "e.g. 'layers.0.*' or '*.ffn.w2'.")
@click.option("--clip-search/--no-clip-search", default=None,
              help="Search a clipping ratio per group minimizing the weight MSE (else plain min/max). "
                   "Default: off for rtn, on for gptq/awq, as measured on SmolLM2-135M int4-g64 "
                   "(rtn: ppl 18.32 min/max vs 19.00 searched; see ConvertOptions.clip in convert/options.py).")
@click.option("--method", type=click.Choice(METHODS), default="rtn", show_default=True,
              help="rtn: round-to-nearest; gptq: error-compensating, calibrated; awq: activation-aware "
                   "scales folded into the norms, calibrated; imatrix: importance-weighted rounding; qat: "
                   "EfficientQAT, each layer trained after --qat-init quantized it (calibrated methods run "
                   "layer by layer, CUDA when available).")
@click.option("--calib", default=DEFAULT_SOURCE, show_default=True, metavar="SOURCE",
              help="Calibration text for calibrated methods: mix (half pydoc, half self; generalizes best "
                   "out of domain, see README), pydoc (built-in, CPython's pydoc topics), self (sampled from "
                   "the model; cached per model), or a UTF-8 file.")
@click.option("--calib-samples", type=click.IntRange(1), default=DEFAULT_SAMPLES, show_default=True,
              help="Calibration windows.")
@click.option("--calib-seqlen", type=click.IntRange(2), default=DEFAULT_SEQLEN, show_default=True,
              help="Tokens per calibration window.")
@click.option("--damp", type=click.FloatRange(0, 10), default=DEFAULT_DAMP, show_default=True,
              help="GPTQ/SparseGPT dampening, a fraction of the Hessian's mean diagonal (0.03: best of 0.01, "
                   "0.03, 0.1 in both domains on SmolLM2, see README).")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ: quantize columns by decreasing activation energy (with static groups, or a stored "
                   "column permutation where those do not combine; see bench/bench_quality.py).")
@click.option("--static-groups/--no-static-groups", default=None,
              help="GPTQ: fix each group's scale and zero-point from the unquantized weights in input order "
                   "(AutoGPTQ's static_groups, llm-compressor's actorder=weight), so act-order stores no "
                   "permutation and the file exports exactly to GGUF (at g32) and compressed-tensors. Default: "
                   "on wherever it combines (not with --prune, --outliers, --outlier-threshold); better than "
                   "the permutation on both corpora of the README's measurements.")
@click.option("--prune", metavar="PATTERN", callback=_check_prune,
              help="Prune every decoder projection (never embeddings, head, norms): 2:4 or 4:8 (n of every m "
                   "input columns kept, stored compressed in quantized schemes: 2:4 int4-g64 is 3.4 bits/weight "
                   "instead of 4.4; f16/bf16 store the zeros densely, for quality only) or a fraction such as "
                   "50% of every row (stored densely: no bitmask, see convert/prune.py). Disables act-order.")
@click.option("--prune-method", type=click.Choice(PRUNE_METHODS), default=None,
              help="magnitude: largest |W|, no calibration; wanda: |W|·‖x‖ on the calibration data, no weight "
                   "update; sparsegpt: Hessian-based pruning with weight reconstruction (with --method gptq "
                   "pruned and quantized in one sweep). Default: sparsegpt with --method gptq, else wanda. "
                   "Not with --method awq.")
@click.option("--outliers", metavar="FRACTION", callback=_check_outliers,
              help="Keep this fraction of every decoder projection's weights (e.g. 0.5% or 1%) exactly in 16 "
                   "bits in a sparse sidecar (SpQR-style; 32 bits + row pointers each, counted in bits/weight), "
                   "chosen by their effect on the layer output; the rest is quantized without them. Needs "
                   "calibration data (--calib), also with --method rtn.")
@click.option("--outlier-threshold", type=click.FloatRange(0, min_open=True), default=None, metavar="T",
              help="LLM.int8(): input channels whose calibration activations reach |x| >= T (6.0 in the paper) "
                   "keep their weight column in 16 bits; any scheme. Needs calibration data.")
@click.option("--smooth", type=float, default=None, metavar="ALPHA",
              help="SmoothQuant with --scheme w8a8: move activation outliers into the weights with "
                   "s = max|X|^ALPHA / max|W|^(1-ALPHA) per input channel (0..1; 0.5 in the paper, 0.65 "
                   "best on SmolLM2 of 0-0.9, see README), folded into the norms and v/up rows; calibrated (--calib).")
@click.option("--act-static", is_flag=True,
              help="W8A8: store one activation scale per tensor from calibration instead of per-token scales "
                   "computed at run time.")
@click.option("--act-calib", type=click.Choice(("minmax", "percentile", "mse", "kl")), default=None,
              help="With --act-static: the range of the static scale: largest |x|, 99.99th percentile, least "
                   "squared error, or TensorRT's KL-divergence calibration. Default minmax.")
@click.option("--target-bpw", type=click.FloatRange(0, 32, min_open=True), default=None, metavar="BITS",
              help="Choose every projection's, the embedding's and the head's scheme for a file of BITS bits per "
                   "weight (the whole file: embeddings, norms, scales and header included), spending bits where "
                   "the measured sensitivity says they matter (convert/allocate.py). Replaces --scheme.")
@click.option("--max-kl", type=click.FloatRange(0, min_open=True), default=None, metavar="NATS",
              help="Like --target-bpw, but the smallest file whose predicted KL divergence to the unquantized "
                   "model stays under NATS per token.")
@click.option("--candidates", default=None, metavar="SCHEMES",
              help="With --target-bpw/--max-kl: the schemes a tensor may take, comma-separated. Default: "
                   "int2..int6 in groups of 64 and 128, and int8 per channel.")
@click.option("--sensitivity-samples", type=click.IntRange(1), default=16, show_default=True,
              help="Calibration windows of the sensitivity measurement (one forward and backward pass).")
@click.option("--score", type=click.Choice(("fisher", "output")), default="fisher", show_default=True,
              help="How a candidate's error is scored: fisher (layer-output error weighted by the loss "
                   "gradient's second moment: predicted nats/token) or output (relative layer-output error).")
@click.option("--qat-init", type=click.Choice(QAT_INITS), default="gptq", show_default=True,
              help="--method qat: the method that quantizes each layer before its training.")
@click.option("--qat-epochs", type=click.IntRange(0), default=QatOptions.epochs, show_default=True,
              help="--method qat: Block-AP epochs over the calibration windows, per layer.")
@click.option("--qat-lr", type=click.FloatRange(0), default=QatOptions.lr, show_default=True,
              help="--method qat: Block-AP learning rate of the scales and zero-points.")
@click.option("--qat-weight-lr", type=click.FloatRange(0), default=QatOptions.weight_lr, show_default=True,
              help="--method qat: Block-AP learning rate of the weights, norms and biases.")
@click.option("--qat-samples", type=click.IntRange(1), default=None,
              help="--method qat: calibration windows Block-AP trains on (default: all of --calib-samples).")
@click.option("--qat-batch", type=click.IntRange(1), default=QatOptions.batch, show_default=True,
              help="--method qat: windows per Block-AP step.")
@click.option("--e2e-steps", type=click.IntRange(0), default=QatOptions.e2e_steps, show_default=True,
              help="--method qat: E2E-QP steps training the scales through the whole model (0: none).")
@click.option("--e2e-lr", type=click.FloatRange(0), default=QatOptions.e2e_lr, show_default=True,
              help="--method qat: E2E-QP learning rate.")
@click.option("--e2e-batch", type=click.IntRange(1), default=QatOptions.e2e_batch, show_default=True,
              help="--method qat: windows per E2E-QP step.")
@click.option("--e2e-loss", type=click.Choice(E2E_LOSSES), default=QatOptions.e2e_loss, show_default=True,
              help="--method qat: E2E-QP's loss: next-token cross-entropy (ce) or KL divergence from the float "
                   "model's next-token distributions (kl).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the calibration sampling and of QAT's batch order: equal seeds give equal files.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the resulting size; write nothing.")
@click.option("--force", is_flag=True, help="Replace OUT.qbin if it exists.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a pytorch_model.bin-only checkpoint (loaded with torch.load(weights_only=True)).")
@click.option("--merge-lora", type=click.Path(file_okay=False), default=None, metavar="ADAPTER_DIR",
              help="Merge a peft LoRA adapter (qtune's, or peft's for this model) into the weights, then quantize.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def main(ctx: click.Context, src: str, dst: str, quiet: bool, **fields) -> None:
    """Convert MODEL (a Hugging Face checkpoint folder, or a GGUF file) to OUT.qbin.

    Reads Llama, Mistral, Qwen2 and Qwen3 checkpoints (safetensors, bf16/fp16/fp32, sharded or
    not) with their tokenizer and chat template; streams one tensor at a time. A GGUF file's
    F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors are imported without requantization; other GGUF types
    need --scheme, which requantizes them. A GPTQ, AWQ (GEMM) or compressed-tensors folder is
    imported as it is (its integer grid mapped exactly, act-order's g_idx as a permutation).
    """
    if is_gguf(Path(src)):
        _import_gguf(ctx, src, dst, fields)
        return
    if quant_method(Path(src)) in HF_FORMATS:
        _import_quantized(ctx, src, dst, fields)
        return
    if fields["scheme"] is None:
        if fields["target_bpw"] is None and fields["max_kl"] is None:
            raise InputError("give --scheme (e.g. int4-g64), or --target-bpw BITS for a file of that size")
        fields["scheme"] = ConvertOptions.scheme
    options = ConvertOptions(**fields, progress=not quiet and not fields["dry_run"],
                             command=shlex.join((ctx.obj or {}).get("argv", ["qconvert"])))
    try:
        report = convert(src, dst, options=options)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):  # the writer has removed its partial files
            raise InputError(f"{dst}: {e.strerror} while writing; nothing was written. Free space on its disk "
                             "(or raise the file-size limit) and run the conversion again") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename and Path(e.filename).parent == Path(dst).parent:
            raise InputError(f"{dst}: its folder is not writable ({e.strerror}); nothing was written. Choose an "
                             "output folder you can write to") from None
        raise InputError(str(e)) from None
    except ValueError as e:  # ConvertError, CheckpointError, QbinError
        raise InputError(str(e)) from None
    if options.dry_run:
        for line in report.plan_lines():
            click.echo(line)
    click.echo(report.summary())


# What a GGUF import takes from the command line; any other option asks for the float checkpoint.
GGUF_OPTIONS = ("scheme", "force")


def _import_as_is(ctx: click.Context, src: str, fields: dict, allowed: tuple[str, ...], what: str, run) -> None:
    """Import a file that is already quantized with run(command); options outside `allowed`
    need float weights and are refused."""
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    extra = [name for name in fields if name not in allowed and ctx.get_parameter_source(name) in given]
    if extra:
        raise InputError(f"{src} {what}; --{extra[0].replace('_', '-')} needs the Hugging Face checkpoint instead")
    try:
        report = run(shlex.join((ctx.obj or {}).get("argv", ["qconvert"])))
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from None
    click.echo(report.summary())


def _import_gguf(ctx: click.Context, src: str, dst: str, fields: dict) -> None:
    _import_as_is(ctx, src, fields, GGUF_OPTIONS, "is a GGUF file: it is imported as it is (tensors without a qbin "
                  "layout requantized with --scheme)",
                  lambda command: import_gguf(src, dst, fields["scheme"], force=fields["force"], command=command))


def _import_quantized(ctx: click.Context, src: str, dst: str, fields: dict) -> None:
    _import_as_is(ctx, src, fields, ("force",), f"is already quantized ({quant_method(Path(src))}): it is imported "
                  "as it is",
                  lambda command: import_hf_quantized(src, dst, force=fields["force"], command=command))


EXPORTS = ("gguf", *LAYOUTS)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", metavar="FILE.qbin", type=click.Path(path_type=str))
@click.option("--to", "fmt", type=click.Choice(EXPORTS), required=True, help="The format to write.")
@click.argument("dst", metavar="OUT", type=click.Path(path_type=str))
@click.option("--requantize", metavar="TYPE", default=None,
              help="GGUF type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) for tensors no GGUF type holds; the error it adds "
                   "is reported. Without it such tensors are refused.")
@click.option("--fold", is_flag=True,
              help="compressed-tensors / gptq: requantize tensors the layout cannot hold (outliers, 16-bit columns, "
                   "nf4, act-order for compressed-tensors) onto its grid by round-to-nearest; the error is reported.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export(src: str, fmt: str, dst: str, requantize: str | None, fold: bool, force: bool) -> None:
    """Write FILE.qbin for another runtime: a GGUF file for llama.cpp and ollama (--to gguf OUT.gguf),
    or a Hugging Face folder for transformers, vLLM and SGLang (--to compressed-tensors DIR, --to gptq DIR).

    GGUF: int4 in groups of 32 becomes Q4_0 (symmetric) or Q4_1, symmetric int8 in groups of 32
    Q8_0, float tensors stay as they are: convert with --scheme int4-g32 (GPTQ and AWQ too,
    without act-order or outliers) for a file llama.cpp runs at the quantizer's quality.
    compressed-tensors: every integer grid (W4A16, W8A8 as int-quantized), codes and scales copied;
    gptq: one grid for the model, act-order as g_idx.
    """
    if fmt == "gguf" and fold:
        raise InputError("--fold applies to compressed-tensors and gptq exports; GGUF takes --requantize TYPE")
    if fmt != "gguf" and requantize:
        raise InputError(f"--requantize applies to GGUF exports; for {fmt} pass --fold")
    try:
        report = (export_gguf(src, dst, requantize, force=force) if fmt == "gguf"
                  else export_hf(src, dst, fmt, fold=fold, force=force))
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from None
    click.echo(report.summary())


if __name__ == "__main__":
    main()
