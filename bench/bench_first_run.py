"""Time to first token of `qrun` on a fresh install (empty numba cache) and with a warm cache.

    python bench/bench_first_run.py MODEL.qbin [--threads 2] [--runs 3]

Each figure is measured in new processes, the numba cache in a fresh temporary folder
(NUMBA_CACHE_DIR), from launching `qrun FILE -p "The capital of France is"` to its first byte on
stdout:
  cold: nothing compiled yet (what the first `qrun` of an install does without the warm-up);
  warm-up: `python -m qformat.runtime.warm` in a fresh cache (what scripts/setup.sh runs), then
           the first `qrun` after it;
  warm: the best of --runs more `qrun` calls on the warmed cache.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

PROMPT = "The capital of France is"


def first_token(path: str, threads: int, env: dict) -> float:
    """Seconds from launching qrun to its first byte of output."""
    cmd = [sys.executable, "-m", "qformat.runtime.cli", path, "-p", PROMPT, "-n", "4", "-q", "-t", "0",
           "--threads", str(threads)]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = p.stdout.read(1)
    elapsed = time.perf_counter() - t
    _, err = p.communicate(timeout=600)
    if p.returncode != 0 or not first:
        raise RuntimeError(f"qrun failed: {err.decode()[-500:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as cold_dir, tempfile.TemporaryDirectory() as warm_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cold_dir)
        print(f"cold: first token after {first_token(a.model, a.threads, env):.2f} s (empty numba cache)")
        env = dict(os.environ, NUMBA_CACHE_DIR=warm_dir)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qformat.runtime.warm"], env=env, check=True, capture_output=True)
        warm_up = time.perf_counter() - t
        first = first_token(a.model, a.threads, env)
        print(f"warm-up: python -m qformat.runtime.warm {warm_up:.2f} s, then first token after {first:.2f} s")
        best = min(first_token(a.model, a.threads, env) for _ in range(a.runs))
        print(f"warm: first token after {best:.2f} s (best of {a.runs})")


if __name__ == "__main__":
    main()
