"""qtune: the command line over qformat.tune.train.tune(). It parses, validates and calls."""
from __future__ import annotations

import click

from qformat.convert.cli import InputError, OneLineCommand
from qformat.errors import QbinError

from .data import DataError
from .distributed import COMPRESSIONS
from .model import TARGETS
from .train import TuneOptions, tune

DEFAULTS = TuneOptions()


def _targets(ctx, param, value: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise click.BadParameter(f"{', '.join(unknown) or 'none'}: choose from {', '.join(TARGETS)}")
    return names


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("base", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help='Training data: .jsonl of {"messages": [...]} (loss on assistant turns) or {"text": ...}, '
                   "or a text file (documents separated by blank lines).")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False),
              help="Held-out data, as --data (default: --eval-fraction of --data's examples).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="The adapter's folder (peft's layout).")
@click.option("--rank", type=click.IntRange(1), default=DEFAULTS.rank, show_default=True)
@click.option("--alpha", type=float, default=DEFAULTS.alpha, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=DEFAULTS.dropout, show_default=True)
@click.option("--targets", default=",".join(TARGETS), show_default=True, callback=_targets,
              help="Projections to adapt, comma-separated.")
@click.option("--steps", type=click.IntRange(1), default=None, help="Optimizer steps (default: --epochs' worth).")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=DEFAULTS.epochs, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=DEFAULTS.lr, show_default=True)
@click.option("--batch-tokens", type=click.IntRange(1), default=DEFAULTS.batch_tokens, show_default=True,
              help="Tokens per optimizer step (whole sequences of --context).")
@click.option("--context", type=click.IntRange(2), default=DEFAULTS.context, show_default=True,
              help="Tokens per training sequence (examples are packed end to end).")
@click.option("--eval-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=DEFAULTS.eval_fraction, show_default=True)
@click.option("--eval-every", type=click.IntRange(0), default=DEFAULTS.eval_every, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(0), default=DEFAULTS.checkpoint_every, show_default=True)
@click.option("--grad-compression", type=click.Choice(COMPRESSIONS), default=DEFAULTS.grad_compression,
              show_default=True, help="Gradients between processes under torchrun (QSGD bits, float16 or none).")
@click.option("--error-feedback", is_flag=True,
              help="With QSGD: carry each bucket's rounding residual into its next gradient.")
@click.option("--qsgd-chunk", type=click.IntRange(min=1), default=DEFAULTS.qsgd_chunk, show_default=True,
              help="With QSGD: values that share one norm (smaller: less rounding noise, more bytes).")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in --output.")
@click.option("--force", is_flag=True, help="Replace an existing --output.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def main(base: str, data: str, eval_data: str | None, output: str, resume: bool, force: bool, quiet: bool,
         **fields) -> None:
    """Fine-tune LoRA adapters (QLoRA) on the frozen quantized model BASE.qbin."""
    try:
        report = tune(base, data, output, TuneOptions(**fields), eval_data=eval_data, resume=resume, force=force,
                      progress=not quiet)
    except (DataError, QbinError, ValueError, FileExistsError) as e:
        raise InputError(str(e)) from None
    except FileNotFoundError as e:
        raise InputError(f"{e.filename}: no such file") from None
    if not quiet and report.adapter.exists():
        first, last = report.eval_losses[0], report.eval_losses[-1]
        click.echo(f"{report.adapter}: {report.steps} steps, {report.tokens} tokens in {report.seconds:.1f} s; "
                   f"held-out loss {first:.4f} -> {last:.4f} ({100 * (last / first - 1):+.1f}%), "
                   f"{report.train_rows} training and {report.eval_rows} held-out sequences")
        if report.processes > 1:
            click.echo(f"{report.processes} processes; gradients sent per process: {report.bytes_sent} bytes "
                       f"({report.bytes_uncompressed / max(report.bytes_sent, 1):.1f}x fewer than float32)")
