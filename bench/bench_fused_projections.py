"""Phi-3's fused projections kept fused or split at conversion (issue 19): the CPU's GEMV (decode)
and GEMM (prefill) of one stacked q|k|v matrix against three, and of one gate|up against two, side
by side in one process (EVAL.md: ratios measured in the same run, best of several rounds, the
variants interleaved).

    python bench/bench_fused_projections.py [--scheme int4-g64] [--threads 2] [--rounds 5]
                                            [--calls 40] [--tokens 128]

Random weights (bench/synthetic.py: the kernels' work does not depend on the values), timed
through the per-operation ops (kernels.registry.linear_op), so the split side also pays one
Python call per matrix that the fused decode step does not: its ratio bounds what fusing
could gain there. One line per figure:
  SHAPE GROUP gemv|gemm  fused_us  split_us  split/fused
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (dim, q|k|v rows, gate|up rows) of the released configs
SHAPES = {
    "phi-3-mini": (3072, (3072, 3072, 3072), (8192, 8192)),  # 32 heads of 96, no GQA
    "phi-4-mini": (3072, (3072, 1024, 1024), (8192, 8192)),  # 24 heads of 128, 8 kv heads
}


def best_us(run, calls: int, rounds: int) -> float:
    """Microseconds per call of run(), the best of `rounds` rounds of `calls` calls."""
    run()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default="int4-g64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=40, help="GEMV calls per round (GEMM: a quarter)")
    ap.add_argument("--tokens", type=int, default=128, help="prefill rows of the GEMM")
    a = ap.parse_args()

    import numba

    from synthetic import random_linear

    from qformat.kernels.registry import linear_op

    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    print(f"# {a.scheme}, {a.threads} threads, best of {a.rounds}; per-op path (kernels.registry.linear_op)")
    for shape, (dim, qkv, gate_up) in SHAPES.items():
        for group, parts in (("qkv", qkv), ("gate_up", gate_up)):
            fused = linear_op("cpu", random_linear("fused", sum(parts), dim, a.scheme, rng))
            split = [linear_op("cpu", random_linear(f"part{i}", rows, dim, a.scheme, rng)) for i, rows in enumerate(parts)]
            x = rng.standard_normal(dim).astype(np.float32)
            xs = rng.standard_normal((a.tokens, dim)).astype(np.float32)
            out_fused = np.empty(sum(parts), np.float32)
            outs = [np.empty(rows, np.float32) for rows in parts]

            def gemv_split():
                for op, out in zip(split, outs):
                    op.gemv(x, out)

            def gemm_split():
                for op in split:
                    op.gemm(xs)

            figures = {"gemv": (lambda: fused.gemv(x, out_fused), gemv_split, a.calls),
                       "gemm": (lambda: fused.gemm(xs), gemm_split, max(1, a.calls // 4))}
            for kind, (run_fused, run_split, calls) in figures.items():
                f_us, s_us = best_us(run_fused, calls, a.rounds), best_us(run_split, calls, a.rounds)
                # interleaved: a second pass of each, the better one kept
                f_us = min(f_us, best_us(run_fused, calls, a.rounds))
                s_us = min(s_us, best_us(run_split, calls, a.rounds))
                print(f"{shape} {group} {kind}: fused {f_us:9.1f} us  split {s_us:9.1f} us  "
                      f"split/fused {s_us / f_us:.3f}", flush=True)


if __name__ == "__main__":
    main()
