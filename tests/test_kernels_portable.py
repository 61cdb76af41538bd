"""The portable kernels, run on this CPU whatever it has: a subprocess with
QFORMAT_PORTABLE_KERNELS=1 (kernels/cpu/features.py) takes the paths that CPUs without
AVX512-VNNI/BW/VBMI take, and checks them against the NumPy references. On a VNNI machine the
other tests exercise the AVX-512 kernels only; this one keeps the fallbacks compiled and right.
"""
from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import numpy as np
from qformat.kernels import linear_op, reference
from qformat.kernels.cpu import features, int8, quant, sparse
from qformat.schemes import parse_scheme

assert features.PORTABLE and not features.VNNI and not features.VNNI_VBMI
assert quant.ROWS_64 is quant._rows_none and sparse.TILES_N4 is sparse._tiles_n4
assert int8.GEMV is int8.gemv_w8a8
rng = np.random.default_rng(0)


def check(out, ref):
    err = float(np.abs(out - ref).max()) / float(np.abs(ref).max())
    assert err <= 1e-5, err


for scheme, rows, k in (("int4-g64", 70, 576), ("int4-g128", 33, 384), ("int4-g64", 19, 200), ("int6-g64", 21, 576),
                        ("int5-g128", 9, 576), ("int3-g32", 9, 200), ("int2-g64-sym", 9, 200)):
    t = parse_scheme(scheme).quantize("w", rng.standard_normal((rows, k)).astype(np.float32))
    x = rng.standard_normal(k).astype(np.float32)
    op = linear_op("cpu", t)
    check(op.gemv(x, np.empty(rows, np.float32)), reference.gemv_q8act_reference(t, x))
    xs = rng.standard_normal((19, k)).astype(np.float32)  # prefill: dequantized rows, float activations
    assert op.act_group is None
    check(op.gemm(xs), reference.linear(t, xs))

w = rng.standard_normal((40, 256)).astype(np.float32)
blocks = np.abs(w).reshape(40, 64, 4)
mask = (blocks >= np.sort(blocks, axis=2)[:, :, 2:3]).reshape(40, 256)  # the 2 largest of every 4
t = parse_scheme("int4-g64").quantize_nm("w", w, mask, 2, 4)
x = rng.standard_normal(256).astype(np.float32)
check(linear_op("cpu", t).gemv(x, np.empty(40, np.float32)), reference.gemv_nm_q8act_reference(t, x))

t = parse_scheme("w8a8").quantize("w", rng.standard_normal((48, 320)).astype(np.float32))
t.activation = {"bits": 8, "mode": "dynamic"}
x = rng.standard_normal((3, 320)).astype(np.float32)
check(linear_op("cpu", t).gemm(x), reference.linear_w8a8(t, x))
print("portable kernels ok")
"""


def test_portable_kernels_match_references(tmp_path):
    env = dict(os.environ, QFORMAT_PORTABLE_KERNELS="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "portable kernels ok" in out.stdout
