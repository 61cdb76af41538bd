"""QLoRA on a qbin base against peft on the float model, on the same instruction data.

    python bench/bench_tune.py BASE.qbin [--model MODEL_DIR] [--steps 60] [--out DIR] [--plot tune.png]

The data is generated from what every Python install ships (PSF-licensed): for each public
function of a set of standard-library modules with a docstring, the conversation "What does
`module.function` do?" answered by the docstring's first paragraph; one in ten (by a hash of the
name) is held out. qtune trains adapters on BASE.qbin (frozen quantized weights); with --model,
peft trains the same adapters (rank, alpha, targets, learning rate, batches) on the float
transformers model of MODEL_DIR, and qtune's adapter is loaded by peft onto that model and evaluated
on the same held-out rows. One line per evaluation; the held-out loss curves go to --plot.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import time
from pathlib import Path

import click
import numpy as np

MODULES = ("os", "os.path", "shutil", "json", "re", "string", "textwrap", "collections", "itertools", "functools",
           "math", "statistics", "random", "datetime", "pathlib", "glob", "fnmatch", "heapq", "bisect", "copy",
           "pprint", "difflib", "csv", "base64", "hashlib", "zlib", "gzip", "tarfile", "zipfile", "tempfile",
           "subprocess", "socket", "urllib.parse", "html", "email.utils", "calendar", "time", "operator",
           "inspect", "typing", "dataclasses", "enum", "fractions", "decimal", "struct", "codecs", "unicodedata",
           "locale", "logging", "argparse", "shlex", "platform", "sysconfig", "uuid", "secrets", "hmac")


def instructions() -> list[tuple[str, dict]]:
    """(name, {"messages": [...]}) for every documented public function of MODULES."""
    out = {}
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            answer = doc.split("\n\n")[0].replace("\n", " ").strip()
            if not 20 <= len(answer) <= 600:
                continue
            key = f"{mod_name}.{name}"
            out[key] = {"messages": [{"role": "user", "content": f"What does `{key}` do?"},
                                     {"role": "assistant", "content": answer}]}
    return sorted(out.items())


def write_data(folder: Path) -> tuple[Path, Path, int, int]:
    """train.jsonl and eval.jsonl in `folder`; one in ten held out by a hash of the name."""
    import torch  # noqa: F401  (torch.package replaces inspect.getfile, undocumented, on import: the data
    # must not depend on whether torch came first)
    train, held = [], []
    for key, row in instructions():
        (held if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10 == 0 else train).append(row)
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths[0], paths[1], len(train), len(held)


def logits_of(model):
    """A module mapping tokens to a transformers model's logits (what masked_loss and evaluate call)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model(input_ids=tokens).logits

    return Logits()


def plot_curves(path: Path, curves: list[tuple[list, dict]], title: str | None = None) -> None:
    """Held-out loss curves [(step, loss)] with their matplotlib keywords (label, marker, ...), to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for curve, style in curves:
        ax.plot(*zip(*curve), **style)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (assistant tokens)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    click.echo(f"plot: {path}")


def peft_curve(model_dir: Path, base: Path, train: Path, held: Path, options, eval_every: int) -> list:
    """The same run through peft on the float transformers model: [(step, eval loss)]."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qformat import QbinReader
    from qformat.tune.data import Renderer, pack, read_examples
    from qformat.tune.model import TARGETS
    from qformat.tune.train import cosine_schedule, evaluate, masked_loss

    with QbinReader(base) as reader:
        renderer = Renderer(reader)
        rows, mask = pack(read_examples(train, renderer), options.context)
        eval_rows, eval_mask = pack(read_examples(held, renderer), options.context)
    torch.manual_seed(options.seed)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
             "down": "down_proj"}
    model = get_peft_model(hf, LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                                          target_modules=[names[t] for t in options.targets if t in TARGETS]))

    wrapped = logits_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    steps = options.steps
    sched = cosine_schedule(opt, steps, options.warmup)
    batch = max(1, options.batch_tokens // options.context)
    gen = np.random.default_rng(options.seed)

    def held_out() -> float:
        model.eval()
        return evaluate(wrapped, eval_rows, eval_mask, batch)

    curve = [(0, held_out())]
    click.echo(f"peft step 0: held-out loss {curve[0][1]:.4f}")
    for step in range(1, steps + 1):
        pick = gen.choice(len(rows), size=min(batch, len(rows)), replace=False)
        model.train()
        loss, _ = masked_loss(wrapped, rows[pick], mask[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == steps or step % eval_every == 0:
            curve.append((step, held_out()))
            click.echo(f"peft step {step}: held-out loss {curve[-1][1]:.4f}")
    return curve


def peft_with_our_adapter(model_dir: Path, base: Path, adapter: Path, held: Path, options,
                          dequantized: bool) -> float:
    """The held-out loss of qtune's adapter loaded by peft (PeftModel.from_pretrained) onto the
    float transformers model: on BASE's dequantized weights (the base qtune trained on), or on
    the checkpoint's own (what a user who takes the adapter elsewhere gets)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qformat import QbinReader
    from qformat.tune.adapter import load_dequantized
    from qformat.tune.data import Renderer, pack, read_examples
    from qformat.tune.train import evaluate

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with QbinReader(base) as reader:
        rows, mask = pack(read_examples(held, Renderer(reader)), options.context)
        if dequantized:
            load_dequantized(hf, reader)
    model = PeftModel.from_pretrained(hf, str(adapter)).eval()
    return evaluate(logits_of(model), rows, mask, max(1, options.batch_tokens // options.context))


@click.command()
@click.argument("base", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The float checkpoint BASE was converted from (for the peft curve).")
@click.option("--steps", type=int, default=60, show_default=True)
@click.option("--eval-every", type=int, default=10, show_default=True)
@click.option("--rank", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--context", type=int, default=256, show_default=True)
@click.option("--batch-tokens", type=int, default=2048, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-tune"), show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path))
def main(base: Path, model_dir: Path | None, steps: int, eval_every: int, rank: int, lr: float, context: int,
         batch_tokens: int, out: Path, plot: Path | None) -> None:
    from qformat.tune import TuneOptions, tune

    out.mkdir(parents=True, exist_ok=True)
    train, held, n_train, n_held = write_data(out)
    click.echo(f"data: {n_train} training and {n_held} held-out conversations from stdlib docstrings")
    options = TuneOptions(rank=rank, alpha=2.0 * rank, steps=steps, lr=lr, context=context,
                          batch_tokens=batch_tokens, eval_every=eval_every)
    started = time.perf_counter()
    report = tune(base, train, out / "adapter", options, eval_data=held, force=True)
    seconds = time.perf_counter() - started
    ours = [(s, e) for s, _, e in report.curve if e is not None]
    for s, e in ours:
        click.echo(f"qtune step {s}: held-out loss {e:.4f}")
    first, last = ours[0][1], ours[-1][1]
    click.echo(f"qtune: {report.steps} steps, {report.tokens} tokens, {seconds:.0f} s "
               f"({report.tokens / seconds:.0f} tokens/s); held-out loss {first:.4f} -> {last:.4f} "
               f"({100 * (last / first - 1):+.1f}%)")
    for dequantized in (True, False) if model_dir else ():
        loaded = peft_with_our_adapter(model_dir, base, out / "adapter", held, options, dequantized)
        on = f"{base.name}'s dequantized weights" if dequantized else "the checkpoint's own weights"
        click.echo(f"peft with qtune's adapter on the float model, {on}: held-out loss {loaded:.4f} "
                   f"({100 * (loaded / last - 1):+.2f}% of qtune's {last:.4f})")
    theirs = peft_curve(model_dir, base, train, held, options, eval_every) if model_dir else None
    if plot:
        plot_curves(plot, [(ours, {"marker": "o", "label": f"qtune on {base.name}"})]
                    + ([(theirs, {"marker": "s", "label": "peft on the float model"})] if theirs else []))


if __name__ == "__main__":
    main()
