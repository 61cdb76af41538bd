"""Which score predicts the cost of quantizing a tensor: the allocator's Fisher-weighted
layer-output error (nats per token), or the plain relative layer-output error?

For a sample of tensors (every 3rd layer's seven projections, the embedding), each tensor alone
is rounded to one scheme in the float transformers model and the KL of the model's next-token
distribution to the unquantized one is measured on EVAL.md's pydoc windows and on prose
(bench_quality's license texts). Both scores come from one sensitivity pass on the calibration
text (convert/sensitivity.py). Printed: each tensor's scores and measured KL, and per score the
Spearman rank correlation with the measured KL and the ratio predicted / measured.

    python bench/bench_sensitivity.py --model MODEL_DIR [--scheme int3-g64] [--windows 8]
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from bench_quality import load_model, ood_text, reference_logprobs, score, windows_of
from qformat.corpus import eval_text


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@click.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--scheme", default="int3-g64", show_default=True, help="The scheme each tensor is rounded to alone.")
@click.option("--windows", default=8, show_default=True, help="Evaluation windows of 512 tokens per corpus.")
@click.option("--samples", default=16, show_default=True, help="Calibration windows of the sensitivity pass.")
@click.option("--calib", "calib_source", default="pydoc", show_default=True,
              help="Calibration text of the sensitivity pass (pydoc: no sampling from the model needed).")
@click.option("--layer-step", default=3, show_default=True, help="Every n-th layer's projections are sampled.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qformat-bench-sens"))
@click.option("--threads", default=2, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def main(model_dir: Path, scheme: str, windows: int, samples: int, calib_source: str, layer_step: int, work: Path,
         threads: int, json_out: Path | None) -> None:
    from transformers import AutoTokenizer

    from qformat.convert.calibration import calibration_tokens
    from qformat.convert.checkpoint import Checkpoint
    from qformat.convert.groupquant import fake_quant
    from qformat.convert.hf_config import architecture_of, model_args
    from qformat.convert.options import ConvertOptions
    from qformat.convert.plan import plan
    from qformat.convert.sensitivity import measure
    from qformat.schemes import parse_scheme

    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    domains = {"pydoc": windows_of(tok, eval_text(), windows), "prose": windows_of(tok, ood_text(), windows)}
    model = load_model(model_dir, None)
    refs = {d: reference_logprobs(model, w, work / f"ref-{d}-{len(w)}.f16") for d, w in domains.items()}
    config = json.loads((model_dir / "config.json").read_text())
    ckpt = Checkpoint(model_dir)
    args = model_args(config, {}, has_lm_head="lm_head.weight" in ckpt)
    planned, args = plan(ckpt, args, architecture_of(config), ConvertOptions(head="scheme", embed="scheme"))
    calib = calibration_tokens(model_dir, calib_source, samples, 512, 0)
    sens = measure(ckpt, args, planned, np.asarray(calib.tokens), progress=False)
    click.echo(f"sensitivity pass: {samples} windows, calibration loss {sens.loss:.3f}")
    s = parse_scheme(scheme)
    by_name = {p.name: p for p in planned}
    names = [n for n in sens.stats if n.startswith("layers.") and int(n.split(".")[1]) % layer_step == 0]
    names.append("tok_embeddings")
    params = dict(model.named_parameters())
    rows = []
    for name in names:
        hf = by_name[name].hf_name
        w = params[hf].detach().clone()
        w_hat = fake_quant(w, s)
        fisher = sens.predicted_loss(name, w, w_hat, "fisher")
        output = sens.predicted_loss(name, w, w_hat, "output")
        with torch.no_grad():
            params[hf].copy_(w_hat)
        measured = {d: score(model, wins, refs[d])["kl"] for d, wins in domains.items()}
        with torch.no_grad():
            params[hf].copy_(w)
        rows.append({"tensor": name, "fisher": fisher, "output": output, **{f"kl_{d}": v for d, v in measured.items()}})
        click.echo(f"{name:24s} fisher {fisher:.3e}  output {output:.3e}  KL pydoc {measured['pydoc']:.3e}  "
                   f"prose {measured['prose']:.3e}")
    for key in ("fisher", "output"):
        for d in domains:
            pred, meas = [r[key] for r in rows], [r[f"kl_{d}"] for r in rows]
            ratio = np.median(np.asarray(pred) / np.maximum(meas, 1e-12))
            click.echo(f"{key} vs measured KL ({d}): Spearman {spearman(pred, meas):.3f}, "
                       f"median predicted/measured {ratio:.2f}")
    if json_out is not None:
        json_out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
