"""qrun: generate text with a .qbin model (CPU, or an NVIDIA GPU with --device), or measure its
perplexity.

    qrun model.qbin --prompt "The capital of France is"
    echo "Hello" | qrun model.qbin --chat --system "Be brief."
    qrun model.qbin --ppl-default --reference f16.qbin
    qrun model.qbin --lora adapter/ --chat --prompt "add 2 and 3"

Bad input (a file that is not a valid qbin, an unknown option, an empty or too long prompt) is
reported on one line and exits with status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from qformat.errors import QbinError

EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--prompt", "-p", help="Prompt text (default: --prompt-file, else stdin).")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the prompt from this file.")
@click.option("--chat", is_flag=True, help="Apply the file's chat template; without a prompt, a multi-turn "
                                           "session reading one user message per line of stdin.")
@click.option("--system", help="System message for --chat.")
@click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=None,
              help="Most tokens to generate [file's default, else 256].")
@click.option("--temperature", "-t", type=click.FloatRange(min=0), default=None,
              help="0 is greedy [file's default, else 0].")
@click.option("--top-k", type=click.IntRange(min=0), default=None, help="Keep the k most likely tokens (0: off).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Nucleus mass (1: off).")
@click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Drop tokens below min_p x the top probability (0: off).")
@click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Repetition penalty (1: off).")
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output).")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not printed.")
@click.option("--json-schema", "schema_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Answer in JSON valid under this JSON schema file (constrained decoding).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [all cores].")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where to run: the CPU, an NVIDIA GPU (CuPy), or the GPU when there is one.")
@click.option("--context", type=click.IntRange(min=1), default=None, help="KV cache length [model's maximum].")
@click.option("--lora", type=click.Path(path_type=Path), default=None,
              help="A LoRA adapter folder in peft's layout (qtune -o) to run beside the file's projections.")
@click.option("--lora-scale", type=float, default=1.0, show_default=True,
              help="With --lora: multiply the adapter's product by this (0: the base model).")
@click.option("--quiet", "-q", is_flag=True, help="No timings on stderr.")
@click.option("--ppl", "ppl_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Measure perplexity on this text file (EVAL.md protocol) instead of generating.")
@click.option("--ppl-default", is_flag=True, help="Measure perplexity on the EVAL.md corpus (pydoc topics).")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path),
              help="With --ppl: a reference .qbin for KL divergence and top-1 agreement.")
@click.option("--windows", type=click.IntRange(min=1), default=40, show_default=True,
              help="With --ppl: number of windows evaluated.")
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True,
              help="With --ppl: tokens per window.")
def cli(file, prompt, prompt_file, chat, system, max_tokens, temperature, top_k, top_p, min_p,
        repeat_penalty, seed, stop, schema_file, threads, device, context, lora, lora_scale, quiet, ppl_file,
        ppl_default, reference, windows, window):
    """Run the .qbin model FILE."""
    if reference is not None and not (ppl_file or ppl_default):
        raise BadInput("--reference only applies to --ppl/--ppl-default")
    from .api import load, resolve_device

    try:
        device, why = resolve_device(device)
    except ValueError as e:
        raise BadInput(f"--{e}") from None
    if not quiet and why != "asked for":
        click.echo(f"device: {device} ({why})", err=True)
    if lora is None and lora_scale != 1.0:
        raise BadInput("--lora-scale only applies with --lora")
    model = load(file, device=device, threads=threads, context=context, lora=lora, lora_scale=lora_scale)
    if ppl_file or ppl_default:
        _perplexity(model, ppl_file, reference, threads, windows, window, quiet)
        return
    gen = model.reader.generation
    kwargs = dict(
        max_tokens=max_tokens if max_tokens is not None else (gen.max_new_tokens or 256),
        temperature=_pick(temperature, gen.temperature, 0.0), top_k=_pick(top_k, gen.top_k, 0),
        top_p=_pick(top_p, gen.top_p, 1.0), min_p=_pick(min_p, gen.min_p, 0.0),
        repetition_penalty=_pick(repeat_penalty, gen.repetition_penalty, 1.0), seed=seed, stop=list(stop),
        json_schema=_read_schema(schema_file),
    )
    if chat:
        _chat(model, prompt, prompt_file, system, kwargs, quiet)
        return
    text = _read_prompt(prompt, prompt_file)
    _stream(model.generate(text, **kwargs))
    click.echo()
    _report(model, quiet)


def _pick(given, from_file, default):
    """Command line first, then the file's generation defaults, then ours."""
    if given is not None:
        return given
    return from_file if from_file is not None else default


def _read_schema(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"--json-schema {path}: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise BadInput(f"--json-schema {path}: a JSON schema is an object")
    return schema


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise BadInput("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        text = prompt_file.read_text(encoding="utf-8")
    elif prompt is not None:
        text = prompt
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise BadInput("no prompt: pass --prompt TEXT, --prompt-file FILE or pipe text on stdin")
    if not text.strip():
        raise BadInput("empty prompt: give some text to continue")
    return text


def _stream(pieces) -> str:
    out = []
    for piece in pieces:
        out.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    return "".join(out)


def _report(model, quiet: bool) -> None:
    if quiet:
        return
    s = model.stats
    click.echo(f"prefill: {s.prefill_tokens} tokens at {s.prefill_tps:.1f} tokens/s; "
               f"decode: {s.generated_tokens} tokens at {s.decode_tps:.1f} tokens/s ({s.stop_reason})", err=True)


def _chat(model, prompt, prompt_file, system, kwargs, quiet) -> None:
    from .chat import Conversation

    conv = Conversation(system=system)
    if prompt is not None or prompt_file is not None:
        turns = [_read_prompt(prompt, prompt_file)]
    elif not sys.stdin.isatty():
        turns = (line.rstrip("\n") for line in sys.stdin)
    else:
        turns = _interactive()
    for user in turns:
        if not user.strip():
            continue
        _stream(model.chat(conv, user, **kwargs))
        click.echo()
        _report(model, quiet)


def _interactive():
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def _perplexity(model, ppl_file, reference, threads, windows, window, quiet) -> None:
    from qformat import corpus

    from .api import load
    from .evaluate import perplexity

    if window > model.context:
        raise BadInput(f"--window {window} is longer than the model's context of {model.context} tokens")
    text = ppl_file.read_text(encoding="utf-8") if ppl_file else corpus.eval_text()
    ref = load(reference, threads=threads, context=model.context) if reference else None
    result = perplexity(model, text, n_windows=windows, window=window, reference=ref, progress=not quiet)
    for line in result.lines():
        click.echo(line)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every bad input is one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="qrun", standalone_mode=False)
    except click.exceptions.Abort as e:  # click's form of Ctrl-C (and of EOF at a prompt)
        interrupted = isinstance(e.__context__, KeyboardInterrupt)
        click.echo("qrun: interrupted" if interrupted else "qrun: aborted", err=True)
        sys.exit(130 if interrupted else 1)
    except click.ClickException as e:
        click.echo(f"qrun: {e.format_message()}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except QbinError as e:
        click.echo(f"qrun: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except (ValueError, NotImplementedError) as e:
        click.echo(f"qrun: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except BrokenPipeError:
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
