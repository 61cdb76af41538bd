"""Decode GEMV bandwidth on an NVIDIA GPU against the device-to-device copy, per EVAL.md.

    python bench/bench_gpu_gemv.py [--schemes int4-g128,int8,f16] [--shapes 4096x4096,11008x4096,4096x11008]

Shapes are rows x columns of W (Llama-2-7B's projections: 11008x4096 is gate/up, 4096x11008
down). For each, random weights are quantized on the CPU and copied to the GPU in enough copies
to exceed the L2 cache several times over (H200: 60 MB), and one CUDA graph runs a GEMV on each
copy in turn, so every GEMV reads its weights from device memory. One line per figure:

  effective bandwidth = bytes the GEMV must read (codes, scales, zero points, x) + write (y)
                        / seconds per GEMV (CUDA events around graph launches, best of 5)
  copy bandwidth      = 2 x bytes of a 2 GiB device-to-device copy / seconds (read + write)

and their ratio, the figure of issue 5 (goal: at least 0.75).
"""
from __future__ import annotations

import argparse

import numpy as np

# Bytes of weights the rotating copies must cover: several times any GPU's L2 cache.
ROTATE_BYTES = 512 << 20


def copy_bandwidth(cp, nbytes: int = 2 << 30, reps: int = 10) -> float:
    """(read + write) bytes/s of a device-to-device copy of nbytes, best of `reps`."""
    a = cp.ones(nbytes // 4, cp.float32)
    b = cp.empty_like(a)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    best = float("inf")
    for _ in range(reps):
        start.record()
        cp.copyto(b, a)
        stop.record()
        stop.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * nbytes / best


def gemv_seconds(cp, ops, x, y, reps: int = 5) -> float:
    """Seconds per GEMV: a CUDA graph of one GEMV per op (rotating weights), best of reps."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for op in ops[:2]:  # compile and warm before capture
            op.gemv(x, y)
        stream.synchronize()
        stream.begin_capture()
        for op in ops:
            op.gemv(x, y)
        graph = stream.end_capture()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    best = float("inf")
    for _ in range(reps):
        start.record(stream)
        graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, stop) / 1e3 / len(ops))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="int4-g128,int8,f16")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    a = ap.parse_args()
    import cupy as cp

    from qformat.kernels import linear_op
    from qformat.schemes import parse_scheme

    props = cp.cuda.runtime.getDeviceProperties(0)
    copy_bw = copy_bandwidth(cp)
    print(f"device: {props['name'].decode()}; copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s")
    for shape in a.shapes.split(","):
        rows, k = (int(v) for v in shape.split("x"))
        w = np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)
        for scheme in a.schemes.split(","):
            t = parse_scheme(scheme).quantize("w", w)
            op = linear_op("cuda", t)
            weight_bytes = t.nbytes
            ops = [op] + [linear_op("cuda", t) for _ in range(max(1, ROTATE_BYTES // weight_bytes) - 1)]
            x = cp.asarray(np.random.default_rng(1).standard_normal(k).astype(np.float32))
            y = cp.empty(rows, cp.float32)
            sec = gemv_seconds(cp, ops, x, y)
            moved = weight_bytes + 4 * k + 4 * rows
            bw = moved / sec
            print(f"{scheme} {rows}x{k}: {sec * 1e6:.2f} us per GEMV, {bw / 1e12:.2f} TB/s effective = "
                  f"{bw / copy_bw:.2f} of the copy bandwidth ({len(ops)} rotating copies of {weight_bytes / 1e6:.1f} MB)")
            del ops, op


if __name__ == "__main__":
    main()
