"""Decode and prefill speed of the CUDA backend on a Llama-2-7B-shaped model, beside PyTorch f16
eager on the same GPU in the same run (issue 5), and the greedy-text check on SmolLM2.

    python bench/bench_gpu_decode.py [--schemes int4-g128,int8] [--shape llama2-7b]
                                     [--tokens 128] [--prefill 2048] [--greedy-check SMOLLM2.qbin]

Files: random-weight qbins of the shape (bench/synthetic.py) in --work, reused when present.
One line per figure:
  copy bandwidth   2 x bytes / seconds of a 2 GiB device-to-device copy (read + write)
  decode           greedy steps after an 8-token prompt, logits copied to the host each step
                   (as qrun does), best of 3; roofline = bytes of weights per token x tokens/s
                   / copy bandwidth (goal: 0.8)
  prefill          one prompt of --prefill tokens from an empty cache, best of 3
  torch f16 eager  transformers' LlamaForCausalLM of the same shape, random f16 weights, with its
                   KV cache; same token counts (goal: prefill not slower than it)
  greedy-check     the first 32 greedy tokens of SmolLM2 on cuda equal those on the CPU
--device cpu --shape tiny --no-torch runs the same flow on the CPU (a check of the script).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import weight_bytes_per_token  # noqa: E402
from synthetic import SHAPES, write_random_qbin  # noqa: E402

PROMPT = 8
GREEDY_PROMPT = "The capital of France is"


def copy_bandwidth(device: str) -> float:
    if device == "cpu":
        from bench_decode import read_bandwidth

        return read_bandwidth()
    import cupy as cp

    from bench_gpu_gemv import copy_bandwidth as gpu_copy

    return gpu_copy(cp)


def best_of(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_qbin(path: Path, device: str, tokens: int, prefill: int, copy_bw: float) -> None:
    from qformat.reader import QbinReader
    from qformat.runtime.model import Transformer

    reader = QbinReader(path)
    model = Transformer(reader, device=device, context=max(prefill, PROMPT + tokens) + 1)
    vocab = reader.model.vocab_size
    ids = [int(i) for i in np.random.default_rng(0).integers(3, vocab, max(prefill, PROMPT + tokens))]

    def decode():
        logits = model.forward(ids[:PROMPT], 0)
        for pos in range(PROMPT, PROMPT + tokens):
            logits = model.forward([int(np.argmax(logits))], pos)

    decode()  # compile and warm
    sec = best_of(decode)
    tok_s = tokens / sec  # the 8-token prompt is inside the timed call: a slight underestimate
    per_token = weight_bytes_per_token(reader)
    print(f"{path.name} ({device}): decode {tok_s:.1f} tokens/s; roofline {per_token * tok_s / copy_bw:.2f} "
          f"({per_token / 1e9:.2f} GB of weights per token)", flush=True)
    model.forward(ids[:min(prefill, 64)], 0, all_logits=False)
    sec = best_of(lambda: model.forward(ids[:prefill], 0))
    print(f"{path.name} ({device}): prefill {prefill} tokens {prefill / sec:.1f} tokens/s", flush=True)


def bench_torch(shape: str, tokens: int, prefill: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    a = SHAPES[shape]
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                         max_position_embeddings=a.max_seq_len)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, a.vocab_size, (1, max(prefill, PROMPT + tokens)), device="cuda")

    @torch.no_grad()
    def decode():
        out = model(ids[:, :PROMPT], use_cache=True)
        for _ in range(tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
        torch.cuda.synchronize()

    @torch.no_grad()
    def prefill_once():
        model(ids[:, :prefill], use_cache=False)
        torch.cuda.synchronize()

    decode()
    print(f"torch f16 eager ({shape}): decode {tokens / best_of(decode):.1f} tokens/s", flush=True)
    prefill_once()
    print(f"torch f16 eager ({shape}): prefill {prefill} tokens {prefill / best_of(prefill_once):.1f} tokens/s",
          flush=True)
    del model
    torch.cuda.empty_cache()


def greedy_check(path: Path, device: str, n: int = 32) -> None:
    import qformat

    runs = {}
    for dev in ("cpu", device):
        m = qformat.load(path, device=dev)
        ids = m.tokenizer.encode(GREEDY_PROMPT)
        out = []
        for piece in m.generate(ids, max_tokens=n, temperature=0.0):
            out.append(piece)
        runs[dev] = "".join(out)
    same = runs["cpu"] == runs[device]
    print(f"greedy-check {path.name}: {n} tokens on {device} {'equal' if same else 'DIFFER from'} the CPU's: "
          f"{runs[device]!r}" + ("" if same else f" vs {runs['cpu']!r}"), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="int4-g128,int8")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qformat" / "bench-gpu")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--greedy-check", type=Path, default=None, metavar="QBIN")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    copy_bw = copy_bandwidth(a.device)
    print(f"copy bandwidth ({a.device}): {copy_bw / 1e9:.0f} GB/s", flush=True)
    for scheme in a.schemes.split(","):
        path = write_random_qbin(a.work / f"{a.shape}-{scheme}.qbin", SHAPES[a.shape], scheme)
        bench_qbin(path, a.device, a.tokens, a.prefill, copy_bw)
    if not a.no_torch:
        bench_torch(a.shape, a.tokens, a.prefill)
    if a.greedy_check is not None:
        greedy_check(a.greedy_check, a.device)


if __name__ == "__main__":
    main()
