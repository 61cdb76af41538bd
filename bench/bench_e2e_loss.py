"""E2E-QP's loss on its own: more E2E-QP steps on a finished QAT file, with the next-token loss
(ce) or the KL divergence from the float model (kl), scored as bench_quality.py scores files.

    python bench/bench_e2e_loss.py FILE.qbin --loss kl --steps 96 --calib-samples 64

FILE.qbin: a `--method qat` file of the model (bench_quality.py's work folder keeps them, and
its reference log-probabilities, which are computed into --work when it lacks them). The calibration windows are drawn as
the conversion drew them (--calib, --calib-samples, --seed), so the teacher and the windows are
the ones a conversion with `--e2e-loss` would use; only the starting scales differ (the file's).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import torch

import bench_quality as bq
from qformat import QbinReader
from qformat import tensors as T
from qformat.convert.architectures import TENSOR_MAP
from qformat.convert.calibration import calibration_tokens
from qformat.convert.layerwise import embed, layer_forward, rope_tables
from qformat.convert.qat import QatOptions, e2e_qp
from qformat.corpus import EVAL_WINDOWS, eval_text
from qformat.schemes import Scheme


def float_layers(sd: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """Decoder layer `layer`'s float weights (a transformers state dict) under the layer's keys."""
    return {T.parse_name(r.qbin_name(layer))[0].key: sd[r.hf_name(layer)].float()
            for r in TENSOR_MAP if r.per_layer and r.hf_name(layer) in sd}


def float_stream(sd: dict[str, torch.Tensor], args, tokens: np.ndarray) -> torch.Tensor:
    """The float model's stream after its last layer over `tokens` (the KL loss's teacher)."""
    rope = rope_tables(args, tokens.shape[1], torch.device("cpu"))
    x = embed(sd["model.embed_tokens.weight"].float(), tokens, args)
    with torch.no_grad():
        for i in range(args.n_layers):
            w = float_layers(sd, i)
            x = torch.cat([layer_forward(x[j:j + 8], w, args, rope, i) for j in range(0, len(x), 8)])
    return x


@click.command()
@click.argument("qbin", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path.home() / ".cache/qformat/smollm2", show_default=True)
@click.option("--loss", type=click.Choice(["ce", "kl"]), default="kl", show_default=True)
@click.option("--steps", type=int, default=96, show_default=True)
@click.option("--lr", type=float, default=5e-5, show_default=True)
@click.option("--calib", default="mix", show_default=True)
@click.option("--calib-samples", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-quality"),
              show_default=True, help="bench_quality.py's work folder (its ref-*.f16 files, cached).")
@click.option("--ood-windows", type=int, default=20, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
def main(qbin: Path, model_dir: Path, loss: str, steps: int, lr: float, calib: str, calib_samples: int, seed: int,
         work: Path, ood_windows: int, threads: int) -> None:
    """Train QBIN's scales `--steps` more E2E-QP steps on `--loss`, then score it in and out of domain."""
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    reader = QbinReader(qbin)
    args = reader.model
    items = []
    for name in reader.names():
        parsed = T.parse_name(name)
        if parsed is None:  # the tokenizer's bytes
            continue
        t = reader[name]
        scheme = Scheme(t.kind, t.kind, t.group_size, "zeros" not in t.arrays, log_scales="scale_exp" in t.arrays)
        items.append((SimpleNamespace(name=name, role=parsed[0].role, scheme=scheme), t, None))
    tokens = np.asarray(calibration_tokens(model_dir, calib, calib_samples, 512, seed).tokens)
    ref_model = bq.load_model(model_dir, None)
    teacher = float_stream(ref_model.state_dict(), args, tokens) if loss == "kl" else None
    started = time.perf_counter()
    out = e2e_qp(items, args, tokens, QatOptions(e2e_steps=steps, e2e_lr=lr, e2e_loss=loss, seed=seed),
                 torch.device("cpu"), True, teacher)
    click.echo(f"{qbin.name}: e2e-qp {loss}, {steps} steps at lr {lr:g}: {time.perf_counter() - started:.0f} s")
    model = bq.model_of(model_dir, bq.hf_state_dict({p.name: t for p, t, _ in out}, args.n_layers), str(qbin))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for d, text, n in (("pydoc", eval_text(), EVAL_WINDOWS), ("prose", bq.ood_text(), ood_windows)):
        windows = bq.windows_of(tok, text, n)
        s = bq.score(model, windows, bq.reference_logprobs(ref_model, windows, work / f"ref-{d}-{len(windows)}.f16"))
        click.echo(f"{d}: ppl {s['ppl']:.2f}  KL {s['kl']:.4f}  top-1 {100 * s['top1']:.1f}%")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
