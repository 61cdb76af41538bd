"""n:m sparse int4 against dense int4 on the CPU, side by side in one process (EVAL.md: speed as
ratios measured in the same run, best of several rounds, the variants interleaved).

    python bench/bench_sparse.py [MODEL_DIR] [--work DIR] [--threads 1,2] [--tokens 64] [--rounds 5]
                                 [--synthetic tinyllama-1.1b] [--variants 2:4,4:8,perm]
                                 [--skip-gemv] [--skip-decode]

MODEL_DIR: a Hugging Face Llama checkpoint (default $QFORMAT_SMOLLM2); with --synthetic, a random
model of that shape with MODEL_DIR's tokenizer, built in --work/NAME. Files built in --work
(reused when present; --variants chooses which besides the dense one):
  int4-g64.qbin       qconvert's RTN int4-g64 (no clip search)
  int4-g64-2of4.qbin  the same, with every layer linear magnitude-pruned 2:4 and stored compressed
                      (Scheme.quantize_nm from the f16 weights); embeddings and head identical
  int4-g64-4of8.qbin  likewise 4:8
  int4-g64-perm.qbin  int4-g64 with a random act-order permutation on every layer linear: the cost
                      of a GPTQ act-order file (the kernels' work does not depend on the values)
One line per figure:
  gemv  SHAPE threads=T  dense_us  2:4_us (ratio)  4:8_us (ratio)    random weights, int8-act GEMV
  decode FILE threads=T  tok/s  ratio-to-dense                       greedy, fused decode step
  decode int4-g64-perm per-op ...                                    the per-operation path
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096))
# Larger Llama shapes for --synthetic (random weights; SmolLM2's tokenizer and vocabulary), where
# the decoder projections, not the head and the per-call costs, dominate a token's time.
SYNTHETIC = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
}
PROMPT = [1, 504, 3575, 282, 4649, 314]  # any few ids: decode speed does not depend on them


def magnitude_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive input columns (the converter's magnitude pruning)."""
    import torch

    from qformat.convert.prune import Pattern, magnitude_mask as mask_of

    return mask_of(torch.from_numpy(np.ascontiguousarray(w, np.float32)), Pattern(f"{n}:{m}", n, m)).numpy()


def _is_layer_linear(name: str) -> bool:
    return name.startswith("layers.") and name.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def rewrite(dense_path: Path, f16_path: Path, dst: Path, transform) -> None:
    """Copy dense_path to dst with each layer linear replaced by transform(name, float weight,
    stored tensor)."""
    from qformat.reader import QbinReader
    from qformat.writer import QbinWriter

    src, f16 = QbinReader(dense_path), QbinReader(f16_path)
    with QbinWriter(dst, overwrite=True) as w:
        for name in src.names():
            t = src[name]
            if t.kind == "bytes":
                w.add_bytes(name, src.raw_bytes(name))
            elif _is_layer_linear(name):
                w.add_tensor(transform(name, f16[name].dequantize(), t))
            else:
                w.add_tensor(t)
        w.finish(model=src.model, tokenizer=src.tokenizer, chat_template=src.chat_template,
                 generation=src.generation, provenance=src.provenance)


def synthetic_checkpoint(name: str, tokenizer_dir: Path, work: Path) -> Path:
    """A random-weight float16 Llama checkpoint of shape SYNTHETIC[name] in work/name (reused),
    with the tokenizer files of tokenizer_dir (decode speed does not depend on the values)."""
    import json
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dst = work / name
    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    base = json.loads((tokenizer_dir / "config.json").read_text())
    config = LlamaConfig(vocab_size=base["vocab_size"], bos_token_id=base.get("bos_token_id"),
                         eos_token_id=base.get("eos_token_id"), tie_word_embeddings=False,
                         max_position_embeddings=2048, torch_dtype="float16", **SYNTHETIC[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float16).eval()
    model.save_pretrained(dst)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)
    return dst


def build_files(model_dir: Path, work: Path, variants: tuple[str, ...] = ("2:4", "4:8", "perm")) -> dict[str, Path]:
    from qformat.convert import convert
    from qformat.schemes import parse_scheme

    work.mkdir(parents=True, exist_ok=True)
    dense, f16 = work / "int4-g64.qbin", work / "f16.qbin"
    if not dense.exists():
        convert(model_dir, dense, "int4-g64", progress=False, clip_search=False)
    if not f16.exists():
        convert(model_dir, f16, "f16", progress=False)
    scheme = parse_scheme("int4-g64")
    files = {"int4-g64": dense}
    for n, m in ((2, 4), (4, 8)):
        if f"{n}:{m}" not in variants:
            continue
        path = work / f"int4-g64-{n}of{m}.qbin"
        if not path.exists():
            rewrite(dense, f16, path, lambda name, w, t, n=n, m=m: scheme.quantize_nm(name, w, magnitude_mask(w, n, m), n, m))
        files[f"int4-g64-{n}:{m}"] = path
    if "perm" not in variants:
        return files
    path = work / "int4-g64-perm.qbin"
    if not path.exists():
        rng = np.random.default_rng(0)

        def add_perm(name, w, t):
            t.arrays = dict(t.arrays, perm=rng.permutation(t.shape[1]).astype(np.int32))
            return t
        rewrite(dense, f16, path, add_perm)
    files["int4-g64-perm"] = path
    return files


def best_of(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    """Best seconds per call of each function, the functions interleaved round by round."""
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                f()
            best[k] = min(best[k], (time.perf_counter() - t) / inner)
    return best


def bench_gemv(threads: list[int], rounds: int) -> None:
    from qformat.kernels import linear_op
    from qformat.kernels.cpu import set_threads
    from qformat.schemes import parse_scheme

    rng = np.random.default_rng(0)
    scheme = parse_scheme("int4-g64")
    for rows, k in SHAPES:
        w = rng.standard_normal((rows, k)).astype(np.float32)
        tensors = {"dense": scheme.quantize("w", w)}
        for n, m in ((2, 4), (4, 8)):
            tensors[f"{n}:{m}"] = scheme.quantize_nm("w", w, magnitude_mask(w, n, m), n, m)
        x = rng.standard_normal(k).astype(np.float32)
        out = np.empty(rows, np.float32)
        ops = {name: linear_op("cpu", t) for name, t in tensors.items()}
        nbytes = {name: sum(a.nbytes for a in t.arrays.values()) for name, t in tensors.items()}
        inner = max(5, int(2e7 / (rows * k)))
        for n_threads in threads:
            set_threads(n_threads)
            best = best_of({name: (lambda op=op: op.gemv(x, out)) for name, op in ops.items()}, rounds * 4, inner)
            d = best["dense"]
            parts = [f"{name} {best[name] * 1e6:8.1f} us {nbytes[name] / best[name] / 1e9:5.1f} GB/s x{d / best[name]:.2f}"
                     for name in ops]
            print(f"gemv {rows}x{k} threads={n_threads}  " + "  ".join(parts), flush=True)


def bench_decode(files: dict[str, Path], threads: list[int], tokens: int, rounds: int) -> None:
    from qformat.kernels.cpu import set_threads
    from qformat.reader import QbinReader
    from qformat.runtime.model import Transformer

    models = {}
    for name, path in files.items():
        models[name] = Transformer(QbinReader(path), context=len(PROMPT) + tokens + 1)
        assert models[name].fused is not None, f"{name}: no fused decode step"
    if "int4-g64-perm" in files:
        models["int4-g64-perm per-op"] = Transformer(QbinReader(files["int4-g64-perm"]),
                                                     context=len(PROMPT) + tokens + 1, fused=False)

    def run(model):
        logits = model.forward(PROMPT, 0)
        t = time.perf_counter()
        for pos in range(len(PROMPT), len(PROMPT) + tokens):
            logits = model.forward([int(np.argmax(logits))], pos)
        return time.perf_counter() - t

    from bench_decode import read_bandwidth, weight_bytes_per_token

    wbytes = {name: sum(QbinReader(p)[n].nbytes for n in QbinReader(p).names() if _is_layer_linear(n))
              for name, p in files.items()}
    token_bytes = {name: weight_bytes_per_token(QbinReader(p)) for name, p in files.items()}
    bw = read_bandwidth()
    print(f"read bandwidth (numpy sum, 1 thread): {bw / 1e9:.1f} GB/s", flush=True)
    for n_threads in threads:
        set_threads(n_threads)
        best = {name: float("inf") for name in models}
        for m in models.values():
            run(m)
        for _ in range(rounds):
            for name, m in models.items():
                best[name] = min(best[name], run(m))
        d = best["int4-g64"]
        for name in models:
            base = name.split()[0]
            seconds = best[name] / tokens
            extra = (f"  layer weights {wbytes[base] / 2**20:.1f} MiB, all {token_bytes[base] / 2**20:.1f} MiB per "
                     f"token: {token_bytes[base] / seconds / 1e9:.1f} GB/s = {token_bytes[base] / seconds / bw:.2f} "
                     "of the read bandwidth") if name == base else ""
            print(f"decode {name:22s} threads={n_threads}  {tokens / best[name]:7.1f} tok/s  "
                  f"x{d / best[name]:.2f} vs int4-g64{extra}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=os.environ.get("QFORMAT_SMOLLM2"),
                   help="Hugging Face checkpoint folder (default: $QFORMAT_SMOLLM2)")
    p.add_argument("--work", default="bench-sparse-work", help="where the qbins are built and reused")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per run")
    p.add_argument("--rounds", type=int, default=5, help="runs per variant (best is reported)")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC),
                   help="decode a random-weight model of this shape (built in --work) instead of MODEL_DIR's")
    p.add_argument("--variants", default="2:4,4:8,perm", help="files beside dense int4-g64 to decode")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    a = p.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    import psutil

    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}  "
          f"cpus: {psutil.cpu_count()}", flush=True)
    if not a.skip_gemv:
        bench_gemv(threads, a.rounds)
    if not a.skip_decode:
        if not a.model or not Path(a.model).is_dir():
            print("error: MODEL_DIR (or $QFORMAT_SMOLLM2) must be a Hugging Face checkpoint folder", file=sys.stderr)
            return 2
        model, work = Path(a.model), Path(a.work)
        if a.synthetic:
            model, work = synthetic_checkpoint(a.synthetic, model, work), work / a.synthetic
        bench_decode(build_files(model, work, tuple(a.variants.split(","))), threads, a.tokens, a.rounds)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
