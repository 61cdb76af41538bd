"""Open-time benchmark: opening a qbin must cost the same for 1 MiB and 1 GiB of weights.

Writes two files with the same number of tensors (a realistic directory: SmolLM2-135M has
273), one of ~1 MiB and one of ~1 GiB, streamed one tensor at a time, into a temporary folder
that is removed at the end. Then, alternating between the two files in one run, it times
QbinReader construction + taking one tensor's view + reading one byte of it, and verify()
(which reads every byte, so it is expected to scale with the size).

The files were just written, so they are in the page cache: these are warm-cache figures.

    python bench/bench_open.py [--tensors 256] [--repeats 300] [--dir /tmp]
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from qformat import ModelArgs, QbinReader, QbinWriter, Tensor
from qformat.packing import row_nbytes

GROUP = 64


def write_file(path: Path, total_bytes: int, n_tensors: int, k: int, seed: int = 0) -> None:
    """Write n_tensors q4-g64 asymmetric tensors of about total_bytes in all, one at a time."""
    rng = np.random.default_rng(seed)
    n_groups = -(-k // GROUP)
    per_row = row_nbytes(k, GROUP, 4) + 3 * n_groups  # codes + f16 scales + u8 zeros
    rows = max(1, total_bytes // n_tensors // per_row)
    with QbinWriter(path, overwrite=True) as w:
        for i in range(n_tensors):
            arrays = {
                "codes": rng.integers(0, 256, (rows, row_nbytes(k, GROUP, 4)), dtype=np.uint8),
                "scales": rng.uniform(1e-3, 1e-2, (rows, n_groups)).astype(np.float16),
                "zeros": rng.integers(0, 16, (rows, n_groups), dtype=np.uint8),
            }
            w.add_tensor(Tensor(f"layers.{i}.ffn.w1", "q4", (rows, k), arrays, GROUP, False))
        w.finish(model=ModelArgs("llama", 32000, k, n_tensors, 8, 8, k // 8, k, 1e-5, 1e4, 2048, True))


def open_once(path: Path, name: str) -> float:
    """Seconds to open the file, take one tensor's codes view and read its first byte."""
    t0 = time.perf_counter()
    reader = QbinReader(path)
    view = reader[name].arrays["codes"]
    int(view[0, 0])
    elapsed = time.perf_counter() - t0
    del view
    reader.close()
    return elapsed


def verify_once(path: Path) -> float:
    with QbinReader(path) as reader:
        t0 = time.perf_counter()
        reader.verify()
        return time.perf_counter() - t0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.2f} MiB"


@click.command()
@click.option("--tensors", default=256, show_default=True, help="Tensors per file (same for both files).")
@click.option("--small-mib", default=1, show_default=True, help="Size of the small file in MiB.")
@click.option("--large-mib", default=1024, show_default=True, help="Size of the large file in MiB.")
@click.option("--repeats", default=300, show_default=True, help="Timed opens per file.")
@click.option("--verify-repeats", default=5, show_default=True, help="Timed verify() calls per file.")
@click.option("--dir", "folder", type=click.Path(file_okay=False, exists=True), default=None,
              help="Where to write the temporary files (default: the system temp folder).")
def main(tensors: int, small_mib: int, large_mib: int, repeats: int, verify_repeats: int, folder: str | None) -> None:
    """Time opening (and verifying) a ~1 MiB and a ~1 GiB qbin with the same tensor count."""
    with tempfile.TemporaryDirectory(prefix="qbin-bench-", dir=folder) as tmp:
        files = {}
        for label, mib, k in (("small", small_mib, 256), ("large", large_mib, 4096)):
            path = Path(tmp) / f"{label}.qbin"
            t0 = time.perf_counter()
            write_file(path, mib << 20, tensors, k)
            with QbinReader(path) as r:
                header_kib = (r.data_offset - 32) / 1024
                name = r.names()[len(r) // 2]
            files[label] = (path, name)
            print(f"wrote     {label}: {_size(path.stat().st_size)}, {tensors} tensors, header {header_kib:.1f} KiB "
                  f"in {time.perf_counter() - t0:.1f} s")
        for label, (path, name) in files.items():  # warm-up: imports, first map, page cache
            for _ in range(5):
                open_once(path, name)
        opens = {label: [] for label in files}
        for _ in range(repeats):  # alternate, so drift (frequency scaling, other load) hits both
            for label, (path, name) in files.items():
                opens[label].append(open_once(path, name))
        for label, (path, _) in files.items():
            t = opens[label]
            print(f"open+view {label} ({_size(path.stat().st_size)}): median {_ms(statistics.median(t))}, "
                  f"min {_ms(min(t))}, over {repeats} runs")
        ratio = statistics.median(opens["large"]) / statistics.median(opens["small"])
        size_ratio = files["large"][0].stat().st_size / files["small"][0].stat().st_size
        print(f"open ratio large/small: {ratio:.2f}x (file size ratio {size_ratio:.0f}x)")
        verifies = {label: [verify_once(path) for _ in range(verify_repeats)] for label, (path, _) in files.items()}
        for label, (path, _) in files.items():
            t = statistics.median(verifies[label])
            rate = path.stat().st_size / t / (1 << 30)
            print(f"verify    {label} ({_size(path.stat().st_size)}): median {_ms(t)} ({rate:.1f} GiB/s), "
                  f"over {verify_repeats} runs")
        vratio = statistics.median(verifies["large"]) / statistics.median(verifies["small"])
        print(f"verify ratio large/small: {vratio:.0f}x")


if __name__ == "__main__":
    main()
