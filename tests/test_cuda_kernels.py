"""The CUDA kernels (kernels/cuda/*.cu) without and with a GPU.

- Every .cu file compiles with nvcc (CI has nvcc, no GPU).
- The kernels' indexing and arithmetic, compiled for the host with tests/cuda_host/shim.h (blocks
  and threads as loops, a warp's lanes one after another), match the NumPy references.
- On a GPU (marker `gpu`): the CuPy ops of kernels/cuda/linear.py match the references.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qformat.kernels import reference
from qformat.kernels.cuda.module import NVRTC_OPTIONS, SOURCES, source_files
from qformat.schemes import parse_scheme

HOST = Path(__file__).resolve().parent / "cuda_host"
# (scheme, rows, k): 16-byte loads (g128, g64 with whole rows), 4-byte loads (g32: 16-byte
# groups; rows of 100 columns), partial last groups (k = 1000 and 200 with g64 and g128)
GROUPED = [("int4-g128", 13, 512), ("int4-g64", 9, 1000), ("int4-g64-sym", 5, 576), ("int4-g32", 7, 100),
           ("int4-g128", 6, 200), ("int8", 11, 576), ("int8-g64", 6, 1000), ("int8-g32-sym", 5, 96)]


def make(scheme: str, rows: int, k: int, seed: int = 0):
    w = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    return parse_scheme(scheme).quantize("w", w)


def close(a, b, rtol):
    return float(np.abs(a - b).max()) <= rtol * max(float(np.abs(b).max()), 1e-30)


@pytest.mark.parametrize("source", [p.name for p in source_files()])
def test_cuda_source_compiles_with_nvcc(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    out = subprocess.run([nvcc, *NVRTC_OPTIONS, "-arch=sm_90", "-c", str(SOURCES / source), "-o",
                          str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The kernels built for the host by g++ (shim.h), as a ctypes library."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    lib = tmp_path_factory.mktemp("cuda-host") / "libqhost.so"
    out = subprocess.run([gxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", f"-I{HOST}", f"-I{SOURCES}",
                          str(HOST / "driver.cpp"), "-o", str(lib)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def grouped_args(t):
    a = t.arrays
    codes = np.ascontiguousarray(a["codes"])
    zeros = np.ascontiguousarray(a["zeros"]) if "zeros" in a else np.zeros(1, np.uint8)
    return codes, np.ascontiguousarray(a["scales"]).view(np.uint16), zeros, int("zeros" in a)


@pytest.mark.parametrize("scheme,rows,k", GROUPED)
def test_host_gemv_matches_reference(host, scheme, rows, k):
    from qformat.kernels.cuda.linear import gemv_variant, x_padded_len

    t = make(scheme, rows, k)
    group = min(t.group_size, k)
    codes, scales, zeros, has_zeros = grouped_args(t)
    x = np.random.default_rng(1).standard_normal(k).astype(np.float32)
    xp = np.zeros(x_padded_len(k, group), np.float32)
    xp[:k] = x
    want = reference.linear(t, x[None])[0]
    chosen = gemv_variant(t.kind, group, codes.shape[1])
    for name in {chosen, f"gemv_{t.kind}_v1"}:  # the launcher's choice and the 4-byte fallback
        y = np.full(rows, np.nan, np.float32)
        rc = host.host_gemv_grouped(name.encode(), (rows + 3) // 4, 32, 4, ptr(codes), ptr(scales), ptr(zeros),
                                    has_zeros, ptr(xp), ptr(y), rows, k, group, codes.shape[1])
        assert rc == 0
        assert close(y, want, 1e-5), name


@pytest.mark.parametrize("scheme,rows,k", GROUPED)
def test_host_dequant_matches_reference(host, scheme, rows, k):
    t = make(scheme, rows, k, seed=2)
    group = min(t.group_size, k)
    codes, scales, zeros, has_zeros = grouped_args(t)
    row0, n = 1, rows - 2
    out = np.zeros((n, k), np.float16)
    threads = n * codes.shape[1] // 4
    rc = host.host_dequant(4 if t.kind == "q4" else 8, (threads + 255) // 256, 256, 1, ptr(codes), ptr(scales),
                           ptr(zeros), has_zeros, ptr(out), row0, n, k, group, codes.shape[1])
    assert rc == 0
    np.testing.assert_array_equal(out, t.dequantize()[row0:row0 + n].astype(np.float16))


@pytest.mark.parametrize("k", [576, 100])
def test_host_gemv_f16_matches_reference(host, k):
    w = np.random.default_rng(3).standard_normal((10, k)).astype(np.float16)
    x = np.random.default_rng(4).standard_normal(k).astype(np.float32)
    y = np.full(10, np.nan, np.float32)
    assert host.host_gemv_f16(3, 32, 4, ptr(w), ptr(x), ptr(y), 10, k) == 0
    assert close(y, w.astype(np.float32) @ x, 1e-5)


def test_host_rmsnorm_rope_silu_match_reference(host):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 576)).astype(np.float32) * 4
    w = rng.standard_normal(576).astype(np.float32)
    out = np.full_like(x, np.nan)
    host.host_rmsnorm(3, 128, ptr(x), ptr(w), ptr(out), 576, ctypes.c_float(1e-5))
    assert close(out, reference.rmsnorm(x, w, 1e-5), 1e-5)

    n, heads, hd, pos0 = 5, 3, 64, 7
    q = rng.standard_normal((n, heads, hd)).astype(np.float32)
    ang = np.arange(40, dtype=np.float32)[:, None] * rng.random(hd // 2).astype(np.float32)[None]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    got = q.copy()
    total = n * heads * hd // 2
    host.host_rope((total + 127) // 128, 128, ptr(got), ptr(cos), ptr(sin), n, heads, hd, pos0)
    assert close(got, reference.rope(q, cos[pos0:pos0 + n], sin[pos0:pos0 + n]), 1e-6)

    g, u = rng.standard_normal((2, 1000)).astype(np.float32) * 3
    want = reference.silu_mul(g, u)
    host.host_silu_mul(8, 128, ptr(g), ptr(u), ctypes.c_longlong(1000))
    assert close(g, want, 1e-5)


@pytest.mark.parametrize("start,stop", [(0, 1), (0, 300), (140, 700)])
def test_host_attention_decode_matches_reference(host, start, stop):
    """Flash-decoding over 1, 2 and 3 splits of 256 keys, GQA (6 heads on 2 KV heads), a
    sliding window (start > 0), float16 cache."""
    rng = np.random.default_rng(11)
    n_heads, n_kv, hd = 6, 2, 64
    k = rng.standard_normal((stop, n_kv, hd)).astype(np.float16)
    v = rng.standard_normal((stop, n_kv, hd)).astype(np.float16)
    q = rng.standard_normal((n_heads, hd)).astype(np.float32)
    n_splits = -(-(stop - start) // 256)
    part = np.full((n_heads, n_splits, hd + 2), np.nan, np.float32)
    out = np.full((n_heads, hd), np.nan, np.float32)
    host.host_attn_decode(128, ptr(q), ptr(k), ptr(v), ptr(part), ptr(out), n_heads, n_kv, hd, start, stop,
                          ctypes.c_float(0.125))
    window = None if start == 0 else stop - start
    want = reference.attention(q[None], k.astype(np.float32), v.astype(np.float32), stop - 1, window, 0.125)[0]
    assert close(out, want, 1e-5)


@pytest.fixture
def emulated_cupy(host, monkeypatch):
    """kernels/cuda/linear.py with NumPy in place of CuPy and the host-built kernels in place of
    the GPU's: the launchers' buffers, arguments and launch shapes run for real."""
    from qformat.kernels.cuda import linear

    def kernel(source: str, function: str):
        def launch(grid, block, args):
            conv = [ptr(a) if isinstance(a, np.ndarray) else int(a) for a in args]
            shape = (grid[0], block[0], block[1] if len(block) > 1 else 1)
            if function.startswith("gemv_q"):
                rc = host.host_gemv_grouped(function.encode(), *shape, *conv)
            elif function == "gemv_f16":
                rc = host.host_gemv_f16(*shape, *conv)
            else:  # dequant_q4_f16, dequant_q8_f16
                rc = host.host_dequant(int(function[len("dequant_q")]), *shape, *conv)
            assert rc == 0, (function, shape)
        return launch

    monkeypatch.setattr(linear, "_cupy", lambda: np)
    monkeypatch.setattr(linear, "kernel", kernel)
    return linear


@pytest.mark.parametrize("scheme,rows,k", GROUPED + [("f16", 37, 576), ("f16", 5, 100), ("bf16", 5, 100)])
def test_cuda_ops_on_emulated_device(emulated_cupy, scheme, rows, k):
    t = make(scheme, rows, k, seed=7)
    op = (emulated_cupy.CudaDenseOp if scheme in ("f16", "bf16") else emulated_cupy.CudaGroupQuantOp)(t)
    rng = np.random.default_rng(8)
    x = rng.standard_normal(k).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    op.gemv(x, out)
    assert close(out, reference.linear(t, x[None])[0], 1e-5)
    xs = rng.standard_normal((19, k)).astype(np.float32)
    op._block = 4  # several dequantized blocks per GEMM
    assert close(op.gemm(xs), reference.linear(t, xs), 3e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,rows,k", GROUPED + [("f16", 37, 576), ("bf16", 5, 100), ("f32", 6, 64)])
def test_cuda_ops_match_reference(scheme, rows, k):
    import cupy as cp

    from qformat.kernels import linear_op

    t = make(scheme, rows, k, seed=5)
    op = linear_op("cuda", t)
    rng = np.random.default_rng(6)
    x = rng.standard_normal(k).astype(np.float32)
    out = cp.full(rows, cp.nan, cp.float32)
    op.gemv(cp.asarray(x), out)
    assert close(cp.asnumpy(out), reference.linear(t, x[None])[0], 1e-5)
    xs = rng.standard_normal((19, k)).astype(np.float32)
    tol = 1e-5 if scheme in ("f32", "bf16") else 3e-3  # f16 weights and activations on the tensor cores
    assert close(cp.asnumpy(op.gemm(cp.asarray(xs))), reference.linear(t, xs), tol)
    ids = np.array([0, rows - 1])
    assert close(cp.asnumpy(op.rows(ids)), t.dequantize()[ids], 1e-6)
