"""A qbin exported as a quantized Hugging Face folder, run by transformers, against qrun on the qbin;
or a peer's quantized folder imported, run by qrun, against transformers on that folder.

    python bench/bench_hf_export.py --model MODEL_DIR [--scheme int4-g64] [--static-groups]
    python bench/bench_hf_export.py --peer PEER_DIR

Export: converts the checkpoint (GPTQ with act-order; --static-groups keeps its groups in input
order, which compressed-tensors needs), exports it with qformat.convert.export_hf to
compressed-tensors and to GPTQ, re-imports both (the weights must come back identical), and
scores the compressed-tensors folder in transformers (compressed-tensors decompresses it on the
CPU) against qrun on the qbin over the EVAL.md windows, the same token ids fed to both.
Peer: imports a folder written by llm-compressor (or any GPTQ / AWQ / compressed-tensors
writer) with qconvert and scores qrun on the import against transformers on the folder.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import ood_text  # noqa: E402

import qformat  # noqa: E402
from qformat.convert import convert, export_hf, import_hf_quantized  # noqa: E402
from qformat.corpus import eval_text  # noqa: E402
from qformat.reader import QbinReader  # noqa: E402
from qformat.schemes import QUANT_KINDS  # noqa: E402
from qformat.runtime.evaluate import perplexity  # noqa: E402


class TransformersLogits:
    """What runtime.evaluate.perplexity needs of a model (tokenizer, logits(ids)) over transformers."""

    def __init__(self, folder: Path, tokenizer, dequantize: bool):
        import transformers

        extra = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
        self.tokenizer = tokenizer

    def logits(self, ids) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.tensor([list(ids)])).logits[0].float().numpy()


def identical_weights(a: Path, b: Path) -> bool:
    ra, rb = QbinReader(a), QbinReader(b)
    return all(np.array_equal(ra[n].dequantize(), rb[n].dequantize()) for n in ra.names()
               if ra[n].kind in QUANT_KINDS and n != "tok_embeddings")


def compare(qbin: Path, folder: Path, dequantize: bool, threads: int, label: str, model_dir: Path | None) -> None:
    """qrun on the qbin against transformers on the folder; with model_dir also transformers on
    the qbin's dequantized weights (bench_quality.load_model), which the folder must equal."""
    m = qformat.load(qbin, threads=threads)
    peer = TransformersLogits(folder, m.tokenizer, dequantize)
    ref = None
    if model_dir is not None:
        from bench_quality import load_model

        ref = TransformersLogits.__new__(TransformersLogits)
        ref.model, ref.tokenizer = load_model(model_dir, qbin), m.tokenizer
    ids = m.tokenizer.encode(eval_text(), add_bos=False)[:512]
    a, b = m.logits(ids), peer.logits(ids)
    print(f"first window: max |logit difference| qrun vs transformers {np.abs(a - b).max():.4f} of max |logit| "
          f"{np.abs(b).max():.2f}" + (f"; transformers on the folder vs on the qbin's weights "
                                      f"{np.abs(b - ref.logits(ids)).max():.2e}" if ref is not None else ""))
    for name, text, windows in (("pydoc", eval_text(), 40), ("prose", ood_text(), 20)):
        ours = perplexity(m, text, windows, reference=peer)
        theirs = perplexity(peer, text, windows, reference=ref)
        line = (f"{name} ppl: qrun {ours.ppl:.4f}, transformers on {label} {theirs.ppl:.4f}, ratio "
                f"{theirs.ppl / ours.ppl:.5f}; KL(transformers || qrun) {ours.kl:.2e}, top-1 agreement "
                f"{ours.top1:.4f}")
        if ref is not None:
            line += f"; KL(on the qbin's weights || on the folder) {theirs.kl:.2e}"
        print(line + f" ({windows} windows)")


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              envvar="QFORMAT_SMOLLM2", help="HF checkpoint folder to convert and export (default: $QFORMAT_SMOLLM2).")
@click.option("--peer", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A quantized HF folder written by a peer, to import instead.")
@click.option("--qbin", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Export this qbin (converted from --model) instead of converting.")
@click.option("--scheme", default="int4-g64-sym", show_default=True)
@click.option("--static-groups/--no-static-groups", default=True, show_default=True)
@click.option("--calib", default="mix", show_default=True)
@click.option("--calib-samples", default=128, show_default=True)
@click.option("--threads", default=2, show_default=True)
def main(model: Path | None, peer: Path | None, qbin: Path | None, scheme: str, static_groups: bool, calib: str, calib_samples: int,
         threads: int) -> None:
    """Export and compare with transformers, or import a peer's folder and compare."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if peer is not None:
            started = time.perf_counter()
            report = import_hf_quantized(peer, tmp / "peer.qbin")
            print(f"import {peer.name}: {time.perf_counter() - started:.1f} s; " + "; ".join(report.notes))
            asym = any("zeros" in QbinReader(tmp / "peer.qbin")[n].arrays for n in QbinReader(tmp / "peer.qbin").names())
            compare(tmp / "peer.qbin", peer, asym, threads, f"the {peer.name} folder", None)
            return
        if model is None:
            raise click.UsageError("give --model (or $QFORMAT_SMOLLM2) or --peer")
        if qbin is None:
            qbin = tmp / "m.qbin"
            started = time.perf_counter()
            # transformers' dequantize path (asymmetric folders) reads one config group: keep the head in float
            report = convert(model, qbin, scheme, method="gptq", calib=calib, calib_samples=calib_samples,
                             act_order=True, static_groups=static_groups,
                             head="auto" if scheme.endswith("-sym") else "f16", progress=False)
            print(f"convert (gptq act-order{' static groups' if static_groups else ''} {scheme}): "
                  f"{time.perf_counter() - started:.0f} s, {report.file_size / 1e6:.2f} MB")
        asym = any("zeros" in QbinReader(qbin)[n].arrays for n in QbinReader(qbin).names())
        for layout in ("compressed-tensors", "gptq"):
            started = time.perf_counter()
            exported = export_hf(qbin, tmp / layout, layout, fold=layout == "compressed-tensors" and not static_groups)
            seconds = time.perf_counter() - started
            import_hf_quantized(tmp / layout, tmp / f"{layout}.qbin")
            print(f"{layout}: {seconds:.1f} s; " + exported.summary().replace("\n", "; ")
                  + f"; re-imported weights identical: {identical_weights(qbin, tmp / f'{layout}.qbin')}")
        compare(qbin, tmp / "compressed-tensors", asym, threads, "the compressed-tensors export", model)


if __name__ == "__main__":
    main()
