"""Two processes training one adapter: QSGD-compressed gradients against uncompressed ones.

    python bench/bench_qsgd.py BASE.qbin [--seeds 0,1,2] [--compressions none,qsgd:4,qsgd:4+c512,qsgd:4+ef] [--steps 10]
                               [--out DIR] [--plot qsgd.png]

For every seed and compression, `torchrun --nproc-per-node 2 -m qformat.tune` trains on
bench_tune.py's standard-library conversations (one thread per process, gloo), then the run's
held-out curve is read from its checkpoint and its bytes sent per process from its report. One
line per run (recorded in its folder: --reuse takes it instead of rerunning); then per
compression the mean final held-out loss and the seed-to-seed spread, and the bytes against
float32's. --plot draws every run's curve, one colour per compression.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tune import plot_curves, write_data  # noqa: E402


def run(base: Path, train: Path, held: Path, out: Path, seed: int, compression: str, steps: int, eval_every: int,
        batch_tokens: int, context: int) -> tuple[list[tuple[int, float]], int, int]:
    """One 2-process run: ([(step, held-out loss)], bytes sent per process, float32's bytes);
    compression "qsgd:4+ef" adds --error-feedback, "qsgd:4+c512" --qsgd-chunk 512 (both:
    "qsgd:4+ef+c512")."""
    import torch

    compression, *extras = compression.split("+")

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "qformat.tune", str(base),
           "--data", str(train), "--eval", str(held), "-o", str(out), "--steps", str(steps), "--eval-every",
           str(eval_every), "--batch-tokens", str(batch_tokens), "--context", str(context), "--seed", str(seed),
           "--grad-compression", compression, "--force", "--lr", "5e-4"]
    for extra in extras:
        cmd += ["--error-feedback"] if extra == "ef" else ["--qsgd-chunk", extra.removeprefix("c")]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one core per process
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if done.returncode != 0:
        raise click.ClickException(f"{compression} seed {seed}: {done.stderr.strip().splitlines()[-3:]}")
    report = re.search(r"gradients sent per process: (\d+) bytes \(([\d.]+)x fewer than float32\)", done.stdout)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    curve = [(int(s), float(e)) for s, _, e in state["curve"] if e is not None]
    sent = int(report[1]) if report else 0
    return curve, sent, int(sent * float(report[2])) if report else 0


@click.command()
@click.argument("base", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--compressions", default="none,qsgd:4", show_default=True)
@click.option("--steps", type=int, default=10, show_default=True)
@click.option("--eval-every", type=int, default=5, show_default=True)
@click.option("--batch-tokens", type=int, default=1024, show_default=True)
@click.option("--context", type=int, default=256, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-qsgd"), show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reuse", is_flag=True, help="Take the runs already recorded under --out instead of rerunning them.")
def main(base: Path, seeds: str, compressions: str, steps: int, eval_every: int, batch_tokens: int, context: int,
         out: Path, plot: Path | None, reuse: bool) -> None:
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    train, held, n_train, n_held = write_data(out)
    click.echo(f"data: {n_train} training and {n_held} held-out conversations from stdlib docstrings")
    results: dict[str, list] = {}
    for compression in compressions.split(","):
        for seed in (int(s) for s in seeds.split(",")):
            folder = out / f"{compression.replace(':', '').replace('+', '-')}-{seed}"
            record = folder / "bench.json"
            if reuse and record.exists():  # this run's figures from an earlier invocation
                curve, sent, full = json.loads(record.read_text())
            else:
                curve, sent, full = run(base, train, held, folder, seed, compression, steps, eval_every,
                                        batch_tokens, context)
                record.write_text(json.dumps([curve, sent, full]))
            results.setdefault(compression, []).append(curve)
            click.echo(f"{compression} seed {seed}: held-out " + " ".join(f"{s}:{e:.4f}" for s, e in curve)
                       + f"; {sent} gradient bytes sent per process ({full / max(sent, 1):.1f}x fewer than float32)")
    for compression, curves in results.items():
        final = np.array([c[-1][1] for c in curves])
        click.echo(f"{compression}: final held-out loss {final.mean():.4f} (seeds {final.min():.4f}-{final.max():.4f}, "
                   f"spread {final.max() - final.min():.4f})")
    if plot:  # one colour per compression, one line per seed
        plot_curves(plot, [(curve, {"color": f"C{k}", "marker": "o", "alpha": 0.7, "label": name if i == 0 else None})
                           for k, (name, curves) in enumerate(results.items()) for i, curve in enumerate(curves)],
                    title=f"2 processes, {base.name}")


if __name__ == "__main__":
    main()
