"""Compile the CPU kernels that common files run into numba's on-disk cache, ahead of the first
`qrun`: `python -m qformat.runtime.warm [SCHEME ...]` (scripts/setup.sh runs it after installing).

Numba compiles a kernel the first time it is called and caches it (kernels/cpu/__init__.py says
where), for the CPU it runs on. Without this, the first `qrun` of a fresh install spends that
compilation before its first token. A tiny random model of each scheme (the layouts `qconvert`
writes for it: its projections, int8 embeddings and head below 8 bits) is written to a
temporary file and run the two ways a real file runs: one-call decode steps, and a prefill
long enough for the per-operation GEMM path.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qformat import tensors as T
from qformat.config import ModelArgs
from qformat.reader import QbinReader
from qformat.schemes import float_tensor, parse_scheme
from qformat.writer import QbinWriter

from .model import FUSED_BATCH_MAX, FUSED_PROMPT_TOKENS, Transformer

# What the demo converts, and the other layouts of `qconvert --scheme` defaults (int8, f16).
DEFAULT_SCHEMES = ("int4-g64", "int8", "f16")
# Shapes with partial groups at every usual group size, as small as compiling allows.
ARGS = ModelArgs(arch="llama", vocab_size=256, dim=200, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=50,
                 ffn_dim=328, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64, tie_embeddings=True)


def write_model(path: Path, scheme: str, args: ModelArgs = ARGS) -> Path:
    """A random model of `scheme` in the layouts qconvert stores it with (int8 embeddings and
    head below 8 bits)."""
    main = parse_scheme(scheme)
    special = parse_scheme("int8") if main.quantized and main.bits < 8 else main
    rng = np.random.default_rng(0)
    with QbinWriter(path, overwrite=True) as w:
        for entry, layer in T.file_order(args.n_layers, lambda t: t.present(args)):
            shape = entry.shape_of(args)
            values = rng.standard_normal(shape).astype(np.float32) * 0.1
            if entry.role in ("norm", "bias"):
                w.add_tensor(float_tensor(entry.name(layer), 1.0 + values, "f32"))
            else:
                s = special if entry.role in ("embed", "head") else main
                w.add_tensor(s.quantize(entry.name(layer), values))
        w.finish(model=args)
    return path


def warm(schemes=DEFAULT_SCHEMES) -> list[tuple[str, float]]:
    """(scheme, seconds) for each scheme's kernels compiled (or loaded from the cache)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="qformat-warm-") as tmp:
        for scheme in schemes:
            started = time.perf_counter()
            batch = FUSED_BATCH_MAX + 1
            model = Transformer(QbinReader(write_model(Path(tmp) / f"{scheme}.qbin", scheme)),
                                kv_blocks=batch + 2)
            model.forward(list(range(2 * FUSED_PROMPT_TOKENS)), 0)  # prefill: the per-op path
            model.forward([1], 2 * FUSED_PROMPT_TOKENS)  # a decode step: the fused step
            seqs = [model.new_sequence() for _ in range(batch)]
            model.run([(s, [1]) for s in seqs])  # a batched decode step (a server's)
            for s in seqs:
                s.free()
            out.append((scheme, time.perf_counter() - started))
    return out


def main(argv: list[str] | None = None) -> int:
    schemes = (argv if argv is not None else sys.argv[1:]) or list(DEFAULT_SCHEMES)
    for scheme, seconds in warm(schemes):
        print(f"qformat: CPU kernels for {scheme} ready ({seconds:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
