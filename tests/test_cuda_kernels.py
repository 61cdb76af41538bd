"""The CUDA kernels (kernels/cuda/*.cu) without and with a GPU.

- Every .cu file compiles with nvcc (CI has nvcc, no GPU).
- The kernels' indexing and arithmetic, compiled for the host with tests/cuda_host/shim.h (blocks
  one after another, a block's threads concurrent with real shuffles and barriers), and the
  CuPy launchers driving them (tests/cuda_emulation.py), match the NumPy references.
- On a GPU (marker `gpu`): the CuPy ops of kernels/cuda/linear.py match the references.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from qformat.kernels import reference
from qformat.kernels.cuda.module import NVRTC_OPTIONS, SOURCES, source_files
from qformat.schemes import parse_scheme

from cuda_emulation import emulate_cuda, host_launch  # noqa: E402

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


@pytest.fixture
def host(cuda_host):
    """The kernels built for the host (conftest.cuda_host)."""
    return cuda_host


def grouped_args(t):
    a = t.arrays
    codes = np.ascontiguousarray(a["codes"])
    zeros = np.ascontiguousarray(a["zeros"]) if "zeros" in a else np.zeros(1, np.uint8)
    return codes, np.ascontiguousarray(a["scales"]).view(np.float16), zeros, np.int32("zeros" in a)


def host_gemv(host, t, x: np.ndarray, name: str, residual: np.ndarray | None = None) -> np.ndarray:
    """W @ x (+ residual, added in place by the kernel) through gemv.cu's kernel `name` on the
    host: q4 after quantize_groups (int8 activations), q8 on the zero-padded float x."""
    from qformat.kernels.cuda.linear import x_padded_len

    rows, k = t.shape
    group = min(t.group_size, k)
    codes, scales, zeros, has_zeros = grouped_args(t)
    y = np.full(rows, np.nan, np.float32) if residual is None else residual.copy()
    out = (y, y, int(residual is not None))  # y, add (y itself: the decode step's in-place residual)
    shape = (rows, k, group, codes.shape[1])
    grid, block = ((rows + 3) // 4,), (32, 4)
    if t.kind == "q4":
        n_groups = -(-k // group)
        xq, d, sums = np.full(n_groups * group, 99, np.int8), np.zeros(n_groups, np.float32), np.zeros(n_groups, np.int32)
        host_launch(host, "quantize_groups", (n_groups,), (32,), (x, xq, d, sums, k, group))
        host_launch(host, name, grid, block, (codes, scales, zeros, has_zeros, xq, d, sums, *out, *shape))
    else:
        xp = np.zeros(x_padded_len(k, group), np.float32)
        xp[:k] = x
        host_launch(host, name, grid, block, (codes, scales, zeros, has_zeros, xp, *out, *shape))
    return y


@pytest.mark.parametrize("scheme,rows,k", GROUPED)
def test_host_gemv_matches_reference(host, scheme, rows, k):
    """q4: the CPU's int8-activation numbers (reference.gemv_q8act_reference); q8: float. Also
    with the residual added in place."""
    from qformat.kernels.cuda.linear import gemv_variant

    t = make(scheme, rows, k)
    x = np.random.default_rng(1).standard_normal(k).astype(np.float32)
    x[:8] = 0.0  # an all-zero start of the first group
    want = reference.gemv_q8act_reference(t, x) if t.kind == "q4" else reference.linear(t, x[None])[0]
    residual = np.random.default_rng(2).standard_normal(rows).astype(np.float32)
    chosen = gemv_variant(t.kind, min(t.group_size, k), t.arrays["codes"].shape[1])
    for name in {chosen, chosen[:-1] + "1"}:  # the launcher's choice and the 4-byte fallback
        assert close(host_gemv(host, t, x, name), want, 1e-5), name
        assert close(host_gemv(host, t, x, name, residual), want + residual, 1e-5), name


@pytest.mark.parametrize("scheme,rows,k", GROUPED)
def test_host_dequant_matches_reference(host, scheme, rows, k):
    t = make(scheme, rows, k, seed=2)
    group = min(t.group_size, k)
    codes, scales, zeros, has_zeros = grouped_args(t)
    row0, n = 1, rows - 2
    out = np.zeros((n, k), np.float16)
    threads = n * codes.shape[1] // 4
    host_launch(host, f"dequant_{t.kind}_f16", ((threads + 255) // 256,), (256,),
                (codes, scales, zeros, has_zeros, out, row0, n, k, group, codes.shape[1]))
    np.testing.assert_array_equal(out, t.dequantize()[row0:row0 + n].astype(np.float16))


@pytest.mark.parametrize("k", [576, 100])
def test_host_gemv_f16_matches_reference(host, k):
    w = np.random.default_rng(3).standard_normal((10, k)).astype(np.float16)
    x = np.random.default_rng(4).standard_normal(k).astype(np.float32)
    y = np.full(10, np.nan, np.float32)
    host_launch(host, "gemv_f16", (3,), (32, 4), (w, x, y, y, 0, 10, k))
    assert close(y, w.astype(np.float32) @ x, 1e-5)
    bias = np.arange(10, dtype=np.float32)
    host_launch(host, "gemv_f16", (3,), (32, 4), (w, x, y, bias, 1, 10, k))
    assert close(y, w.astype(np.float32) @ x + bias, 1e-5)


def test_host_rmsnorm_rope_silu_match_reference(host):
    from qformat.kernels.cuda.device import CUDAOps

    ops = CUDAOps()
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 576)).astype(np.float32) * 4
    w = rng.standard_normal(576).astype(np.float32)
    assert close(ops.rmsnorm(x, w, 1e-5), reference.rmsnorm(x, w, 1e-5), 1e-5)

    n, heads, hd = 5, 3, 64
    q = rng.standard_normal((n, heads, hd)).astype(np.float32)
    ang = np.arange(n, dtype=np.float32)[:, None] * rng.random(hd // 2).astype(np.float32)[None]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    got = q.copy()
    ops.rope(got, cos, sin)
    assert close(got, reference.rope(q, cos, sin), 1e-6)
    got = q.copy()  # a partial rotary: the first 40 of 64 dims
    ops.rope(got, cos[:, :20], sin[:, :20])
    assert close(got, reference.rope(q, cos[:, :20], sin[:, :20]), 1e-6)
    assert np.array_equal(got[..., 40:], q[..., 40:])

    from qformat.config import ACTIVATIONS
    from qformat.kernels.cuda.device import GLU_KERNELS

    assert set(GLU_KERNELS) == set(reference.GLU) == set(ACTIVATIONS)
    for activation in GLU_KERNELS:
        g, u = rng.standard_normal((2, 1000)).astype(np.float32) * 3
        want = reference.GLU[activation](g, u)
        ops.glu(activation, g, u)
        assert close(g, want, 1e-5), activation
    y = rng.standard_normal((2, 1000)).astype(np.float32) * 20
    want = reference.softcap(y, 7.0)
    ops.softcap(y, 7.0)
    assert close(y, want, 1e-5)
    # a shared expert's gated add: one gate value per row
    src, gate = rng.standard_normal((3, 576)).astype(np.float32), rng.standard_normal((3, 1)).astype(np.float32) * 4
    out = rng.standard_normal((3, 576)).astype(np.float32)
    want = out + reference.sigmoid_gate(src, gate)
    ops.sigmoid_gate_add(out, src, gate)
    assert close(out, want, 1e-5)
    # rmsnorm's residual form: out += the norm (a post-norm's add)
    base = rng.standard_normal((3, 576)).astype(np.float32)
    out = base.copy()
    from qformat.kernels.cuda import module

    module.kernel("ops", "rmsnorm_f32")((3,), (128,), (x, w, out, np.int32(576), np.float32(1e-5), np.int32(1)))
    assert close(out, base + reference.rmsnorm(x, w, 1e-5), 1e-5)


@pytest.mark.parametrize("rot", [32, 24])
def test_host_rope_store_matches_reference(host, rot):
    """One decode token: q rotated in place, k rotated into its position's slot of the pool and
    v beside it; rot 24 of head_dim 64's 32 pairs: a partial rotary (the last 16 dims as they are)."""
    rng = np.random.default_rng(13)
    n_heads, n_kv, hd, pos, context = 6, 2, 64, 5, 9
    q, k, v = (rng.standard_normal((h, hd)).astype(np.float32) for h in (n_heads, n_kv, n_kv))
    ang = np.arange(context, dtype=np.float32)[:, None] * rng.random(rot).astype(np.float32)[None]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    kc = np.zeros((context, n_kv, hd), np.float16)
    vc = np.zeros((context, n_kv, hd), np.float16)
    slots = rng.permutation(context).astype(np.int32)
    got = q.copy()
    pairs = (n_heads + n_kv) * hd // 2
    host_launch(host, "rope_store_at", ((pairs + 127) // 128,), (128,),
                (got, k, v, cos, sin, kc, vc, n_heads, n_kv, hd, slots, np.array([pos], np.int32), rot))
    c, s = cos[pos:pos + 1], sin[pos:pos + 1]
    assert close(got, reference.rope(q[None], c, s)[0], 1e-6)
    row = slots[pos]
    np.testing.assert_array_equal(kc[row], reference.rope(k[None], c, s)[0].astype(np.float16))
    np.testing.assert_array_equal(vc[row], v.astype(np.float16))
    others = np.arange(context) != row
    assert not kc[others].any() and not vc[others].any()


@pytest.mark.parametrize("start,stop,cap", [(0, 1, None), (0, 300, None), (140, 700, None), (140, 700, 2.0)])
def test_host_attention_decode_matches_reference(host, start, stop, cap):
    """Flash-decoding over 1, 2 and 3 splits of 256 keys, GQA (6 heads on 2 KV heads), a
    sliding window (start > 0), soft-capped scores, float16 pool; two sequences, each position
    in its own shuffled slot."""
    from qformat.kernels.cuda.device import CUDAOps

    rng = np.random.default_rng(11)
    n_heads, n_kv, hd = 6, 2, 64
    k = rng.standard_normal((2, stop, n_kv, hd)).astype(np.float16)
    v = rng.standard_normal((2, stop, n_kv, hd)).astype(np.float16)
    q = rng.standard_normal((2, n_heads, hd)).astype(np.float32)
    slots = rng.permutation(2 * stop).astype(np.int32).reshape(2, stop)
    pool_k = np.empty((2 * stop, n_kv, hd), np.float16)
    pool_v = np.empty_like(pool_k)
    for b in range(2):
        pool_k[slots[b]], pool_v[slots[b]] = k[b], v[b]
    out = CUDAOps().attention_decode(q, pool_k, pool_v, slots, [start, start], [stop, stop], 0.125, cap)
    window = None if start == 0 else stop - start
    for b in range(2):
        want = reference.attention(q[b][None], k[b].astype(np.float32), v[b].astype(np.float32), stop - 1,
                                   window, 0.125, cap)[0]
        assert close(out[b], want, 1e-5)


@pytest.fixture(autouse=True)
def emulated_device(request, monkeypatch):
    """Host tests run kernels/cuda's launchers on the host build (cuda_emulation.py)."""
    if "host" in request.fixturenames and request.node.get_closest_marker("gpu") is None:
        emulate_cuda(monkeypatch, request.getfixturevalue("host"))


@pytest.mark.parametrize("scheme,rows,k", GROUPED + [("f16", 37, 576), ("f16", 5, 100), ("bf16", 5, 100)])
def test_cuda_ops_on_emulated_device(host, scheme, rows, k):
    from qformat.kernels.cuda import linear

    t = make(scheme, rows, k, seed=7)
    op = (linear.CudaDenseOp if scheme in ("f16", "bf16") else linear.CudaGroupQuantOp)(t)
    rng = np.random.default_rng(8)
    x = rng.standard_normal(k).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    op.gemv(x, out)
    want = reference.gemv_q8act_reference(t, x) if t.kind == "q4" else reference.linear(t, x[None])[0]
    assert close(out, want, 1e-5)
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
    want = reference.gemv_q8act_reference(t, x) if t.kind == "q4" else reference.linear(t, x[None])[0]
    assert close(cp.asnumpy(out), want, 1e-5)
    xs = rng.standard_normal((19, k)).astype(np.float32)
    tol = 1e-5 if scheme in ("f32", "bf16") else 3e-3  # f16 weights and activations on the tensor cores
    assert close(cp.asnumpy(op.gemm(cp.asarray(xs))), reference.linear(t, xs), tol)
    ids = np.array([0, rows - 1])
    assert close(cp.asnumpy(op.rows(ids)), t.dequantize()[ids], 1e-6)


@pytest.mark.gpu
def test_staged_upload_copies_every_byte():
    """Arrays through the two pinned buffers of upload.Uploader, in chunks smaller than some of
    them (a partial last chunk, buffers reused), and a non-contiguous view."""
    from qformat.kernels.cuda.upload import Uploader

    rng = np.random.default_rng(12)
    arrays = [rng.integers(0, 255, n, dtype=np.uint8) for n in (0, 1, 1000, 4096, 10_001)]
    arrays += [rng.standard_normal((37, 64)).astype(np.float16), rng.standard_normal((20, 30))[:, ::3]]
    with pytest.raises(ValueError, match="GiB of GPU memory"):
        Uploader(total_bytes=1 << 50)
    up = Uploader(chunk=1024)
    copies = [up(a) for a in arrays]
    up.close()
    for a, c in zip(arrays, copies):
        assert c.shape == a.shape and c.dtype == a.dtype
        np.testing.assert_array_equal(c.get(), a)
