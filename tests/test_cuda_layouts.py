"""Every grouped layout the converter writes, through the CUDA linear ops (kernels/cuda/linear.py):
q2, q3, q4, q8 and nf4, dense and n:m sparse, with a permutation, sparse outliers and 16-bit
columns, and W8A8 inputs. Decode must give the CPU backend's numbers (the NumPy references of
kernels/reference.py: q4 on int8 activations, the rest in float); prefill multiplies float16
activations on the tensor cores, so it is held to float16's bound. "emulated": the kernels built
for the host with CuPy replaced by NumPy (tests/cuda_emulation.py); "gpu": a real device."""
from __future__ import annotations

import numpy as np
import pytest

from qbin_testutil import add_fp_cols, add_outliers, add_perm
from qformat.kernels import linear_op, reference
from qformat.schemes import Tensor, parse_scheme

BACKENDS = ["emulated", pytest.param("gpu", marks=pytest.mark.gpu)]
GEMM_RTOL = 3e-3  # float16 activations and weights, float32 sums


@pytest.fixture
def backend(request, monkeypatch):
    """The array module of the chosen backend (NumPy under emulation, else CuPy)."""
    if request.param == "emulated":
        from cuda_emulation import NumpyAsCupy, emulate_cuda

        emulate_cuda(monkeypatch, request.getfixturevalue("cuda_host"))
        return NumpyAsCupy()
    import cupy

    return cupy


def close(a, b, rtol):
    return float(np.abs(a - b).max()) <= rtol * max(float(np.abs(b).max()), 1e-30)


def nm_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive columns."""
    rows, k = w.shape
    blocks = np.abs(w).reshape(rows, k // m, m)
    keep = np.argsort(-blocks, axis=2, kind="stable")[:, :, :n]
    mask = np.zeros(blocks.shape, bool)
    np.put_along_axis(mask, keep, True, axis=2)
    return mask.reshape(rows, k)


def layout(scheme: str, rows: int, k: int, nm=None, sidecars: str = "", seed: int = 0) -> Tensor:
    """A quantized random weight; nm: (n, m) pruned; sidecars: any of p(erm), o(utliers), f(p cols)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    s = parse_scheme(scheme)
    t = s.quantize_nm("w", w, nm_mask(w, *nm), *nm) if nm else s.quantize("w", w)
    t.arrays = dict(t.arrays)
    if "p" in sidecars:
        add_perm(t, rng)
    if "o" in sidecars:
        add_outliers(t, rng, cols_dtype=np.uint16)
    if "f" in sidecars:
        add_fp_cols(t, rng, n=2)
    return t


def check_op(t: Tensor, xp, prefill_reference=reference.linear) -> None:
    rows, k = t.shape
    op = linear_op("cuda", t)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, k)).astype(np.float32)
    # an outlier channel: a 16-bit one where there are some, so that int8 activations must skip it
    x[:, int(t.arrays["fp_cols"][0]) if "fp_cols" in t.arrays else 1] = 40.0
    x[4] = 0.0  # an all-zero token
    for i in (0, 4):
        out = xp.full(rows, np.nan, np.float32)
        op.gemv(xp.asarray(x[i]), out)
        assert close(xp.asnumpy(out), reference.decode_reference(t, x[i]), 1e-5), i
    # the decode step's forms: a residual added in place, and int8 codes another op quantized
    residual = rng.standard_normal(rows).astype(np.float32)
    out = xp.asarray(residual.copy())
    op.gemv(xp.asarray(x[0]), out, out)
    assert close(xp.asnumpy(out), reference.decode_reference(t, x[0]) + residual, 1e-5)
    if op.shared_input is not None:
        other = linear_op("cuda", Tensor("other", t.kind, (3, k), {r: a[:3] for r, a in t.arrays.items()},
                                         t.group_size, t.symmetric, t.sparsity))
        assert other.shared_input == op.shared_input
        out = xp.full(rows, np.nan, np.float32)
        op.gemv(xp.asarray(x[0]), out, quantized=other.quantize(xp.asarray(x[0])))
        assert close(xp.asnumpy(out), reference.decode_reference(t, x[0]), 1e-5)
    op_dense = getattr(op, "dense", op)
    op_dense._block = 8  # several dequantized blocks per GEMM
    assert close(xp.asnumpy(op.gemm(xp.asarray(x))), prefill_reference(t, x), GEMM_RTOL)


# per-channel rows of 13 columns: one group that is not whole words
DENSE = [("int3-g32", 19, 200), ("int2-g16-sym", 11, 96), ("int5-g64", 19, 200), ("int6-g32-sym", 11, 96), ("nf4-g64", 19, 200), ("int4", 6, 13), ("int8", 5, 13)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("scheme,rows,k", DENSE)
def test_generic_dense_layouts(backend, scheme, rows, k):
    """Kinds and groups the word kernels do not take: q6, q5, q3, q2, nf4, groups not a multiple of 8."""
    t = layout(scheme, rows, k)
    assert not linear_op("cuda", t).words
    check_op(t, backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("scheme,nm", [("int4-g64", (2, 4)), ("int4-g32-sym", (4, 8)), ("int4-g64", (1, 4)),
                                       ("nf4-g64", (2, 4)), ("int3-g32", (4, 8)), ("int2-g16-sym", (2, 4)),
                                       ("int8-g64", (2, 4)), ("int5-g32", (2, 4)), ("int6-g64", (4, 8))])
def test_sparse_layouts(backend, scheme, nm):
    """n:m sparse rows (q4 on int8 activations, as the CPU's sparse kernel), a partial last group."""
    check_op(layout(scheme, 19, 200, nm=nm), backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("scheme,nm,sidecars", [("int4-g64", None, "pof"), ("int4-g32", None, "p"),
                                                ("int8", None, "of"), ("nf4-g64", None, "pof"),
                                                ("int4-g64", (2, 4), "pof"), ("int3-g32", None, "f")])
def test_sidecars(backend, scheme, nm, sidecars):
    """Permutation, outliers and 16-bit columns on the word kernels and the generic one."""
    t = layout(scheme, 37, 576, nm=nm, sidecars=sidecars)
    check_op(t, backend)


def w8a8(scheme: str, rows: int, k: int, static=None, fp_cols=0, input_scale=False, perm=False, seed=0) -> Tensor:
    """A W8A8 tensor with optional sidecars; the dense part is zero at the 16-bit columns."""
    rng = np.random.default_rng(seed)
    t = layout(scheme, rows, k, sidecars="p" if perm else "", seed=seed)
    if fp_cols:
        add_fp_cols(t, rng, n=fp_cols)
    t.activation = {"bits": 8, "mode": "static" if static is not None else "dynamic"}
    if static is not None:
        t.arrays["act_scale"] = np.array([static], np.float32)
    if input_scale:
        t.arrays["input_scale"] = rng.uniform(0.25, 4.0, k).astype(np.float32)
    return t


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", [dict(), dict(static=0.02), dict(fp_cols=5, input_scale=True), dict(perm=True),
                                  dict(fp_cols=3, input_scale=True, static=0.05), dict(scheme="int8-asym"),
                                  dict(scheme="int8-g64", perm=True)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_w8a8(backend, case):
    """Per-token int8 inputs (dynamic and static, input scales, 16-bit columns, a permutation)."""
    case = dict(case)
    t = w8a8(case.pop("scheme", "w8a8"), 37, 576, **case)
    check_op(t, backend, prefill_reference=reference.linear_w8a8)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_w8a8_on_q4_matches_the_cpu_backend(backend):
    """A 4-bit W8A8 weight: its GEMV quantizes the (already int8) inputs again per group, on
    both backends."""
    t = w8a8("int4-g64", 19, 200, fp_cols=2, input_scale=True)
    x = np.random.default_rng(2).standard_normal(200).astype(np.float32)
    want = np.empty(19, np.float32)
    linear_op("cpu", t).gemv(x, want)
    out = backend.zeros(19, np.float32)
    linear_op("cuda", t).gemv(backend.asarray(x), out)
    assert close(backend.asnumpy(out), want, 1e-5)
