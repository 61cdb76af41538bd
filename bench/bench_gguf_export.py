"""A qbin converted by our quantizers, exported to GGUF and run by llama.cpp, against qrun on the qbin.

    python bench/bench_gguf_export.py --model MODEL_DIR [--method gptq] [--scheme int4-g32]

Converts the Hugging Face checkpoint (default: GPTQ int4-g32 without act-order, which GGUF's
Q4_1 holds exactly; the mix calibration of the README), exports it with
qformat.convert.export_gguf (tensors no GGUF type holds, e.g. the int8 per-channel embedding,
requantized to --requantize), and scores both on the EVAL.md windows: qrun on the qbin, llama.cpp
(llama-cpp-python, the bench extra) on the GGUF, the same token ids fed to both.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf_import import LlamaCppLogits  # noqa: E402
from bench_quality import ood_text  # noqa: E402

import qformat  # noqa: E402
from qformat.convert import convert, export_gguf  # noqa: E402
from qformat.corpus import eval_text  # noqa: E402
from qformat.runtime.evaluate import perplexity  # noqa: E402


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              envvar="QFORMAT_SMOLLM2", help="HF checkpoint folder (default: $QFORMAT_SMOLLM2).")
@click.option("--method", default="gptq", show_default=True)
@click.option("--scheme", default="int4-g32", show_default=True)
@click.option("--act-order/--no-act-order", default=False, show_default=True,
              help="GPTQ act-order stores a permutation, which GGUF cannot.")
@click.option("--calib", default="mix", show_default=True)
@click.option("--calib-samples", default=128, show_default=True)
@click.option("--requantize", default="Q8_0", show_default=True, help="GGUF type for tensors with no mapping.")
@click.option("--threads", default=2, show_default=True)
def main(model: Path, method: str, scheme: str, act_order: bool, calib: str, calib_samples: int, requantize: str,
         threads: int) -> None:
    """Convert, export to GGUF, and compare llama.cpp on the GGUF with qrun on the qbin."""
    with tempfile.TemporaryDirectory() as tmp:
        qbin, out = Path(tmp) / "m.qbin", Path(tmp) / "m.gguf"
        started = time.perf_counter()
        extra = dict(calib=calib, calib_samples=calib_samples, act_order=act_order) if method != "rtn" else {}
        report = convert(model, qbin, scheme, method=method, progress=False, **extra)
        print(f"convert ({method} {scheme}): {time.perf_counter() - started:.0f} s, {report.file_size / 1e6:.2f} MB")
        exported = export_gguf(qbin, out, requantize)
        print(exported.summary().replace("\n", "; "))
        m = qformat.load(qbin, threads=threads)
        peer = LlamaCppLogits(out, m.tokenizer, threads)
        for name, text, windows in (("pydoc", eval_text(), 40), ("prose", ood_text(), 20)):
            ours = perplexity(m, text, windows)
            theirs = perplexity(peer, text, windows)
            print(f"{name} ppl: qrun on the qbin {ours.ppl:.4f}, llama.cpp on the exported GGUF {theirs.ppl:.4f}, "
                  f"ratio {theirs.ppl / ours.ppl:.5f} ({windows} windows)")


if __name__ == "__main__":
    main()
