"""Every layout against every backend, driven by the tables.

The layouts are the format's kinds (qformat.schemes.KINDS) in every form a kind can take
(kernels.layouts.FORMS: grouped kinds dense, n:m sparse or with int8 activations; float kinds
dense); each backend's table is its LINEAR_OPS (kernels.registry). A layout without a kernel on
some backend, a kernel without a case here, or a case without a reference fails, and every
case runs GEMV, GEMM and row lookup against kernels.reference (CUDA on the host emulation, and
on a real device under the `gpu` marker). The detailed per-kernel tests (shapes, group sizes,
every sidecar combination) are test_kernels_cpu.py, test_kernels_sparse.py, test_w8a8.py and
test_cuda_layouts.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from qbin_testutil import add_fp_cols, add_offsets, add_outliers, add_perm
from qformat.kernels import backend, linear_op, reference
from qformat.kernels.layouts import A8, DENSE, FORMS, NM, form_of, q8act
from qformat.schemes import FLOAT_KINDS, QUANT_KINDS, Tensor, float_tensor, parse_scheme

ROWS, K, GROUP = 40, 200, 32  # a partial last group (200 = 6·32 + 8), n:m blocks of 4 and 8 fit
# The scheme of each grouped kind (a new kind must be named here).
SCHEMES = {parse_scheme(f"{base}-g{GROUP}").kind: f"{base}-g{GROUP}"
           for base in ("int8", "int6", "int5", "int4", "int3", "int2", "nf4")}


def layouts() -> list[tuple[str, str]]:
    """(kind, form) of every layout the format can store."""
    return sorted([(k, DENSE) for k in FLOAT_KINDS] + [(k, f) for k in QUANT_KINDS for f in FORMS])


def make(kind: str, form: str, seed: int = 0, log_scales: bool = False) -> Tensor:
    """A random weight of the layout, with the sidecars that form carries in real files;
    log_scales: its scales log-coded (spec §4.3, the "-dq" schemes)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((ROWS, K)).astype(np.float32)
    if kind in FLOAT_KINDS:
        return float_tensor("w", w, kind)
    scheme = parse_scheme(SCHEMES[kind] + ("-dq" if log_scales else ""))
    if form == NM:
        mask = np.zeros((ROWS, K), bool)
        mask[:, 1::2] = True
        return add_outliers(scheme.quantize_nm("w", w, mask, 2, 4), rng)
    t = scheme.quantize("w", w)
    if form == DENSE:
        return add_fp_cols(add_outliers(add_perm(t, rng), rng), rng)
    t = add_fp_cols(t, rng)  # LLM.int8() columns beside W8A8
    return Tensor(t.name, t.kind, t.shape, t.arrays, t.group_size, t.symmetric,
                  activation={"bits": 8, "mode": "dynamic"})


def int8_activations(t: Tensor) -> bool:
    return form_of(t) == A8 or q8act(t.kind, min(t.group_size, t.shape[1]), sparse=form_of(t) == NM)


def test_the_cases_cover_every_layout_and_every_kernel():
    assert set(SCHEMES) == QUANT_KINDS, "a grouped kind has no scheme in SCHEMES"
    for device in ("cpu", "cuda"):
        assert set(backend(device).LINEAR_OPS) == set(layouts()), device
    for kind, form in layouts():
        assert form_of(make(kind, form)) == form


@pytest.fixture(params=["cpu", "emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def device(request, monkeypatch):
    """(device name, array module); "emulated": kernels/cuda on the host (tests/cuda_emulation.py)."""
    from cuda_emulation import NumpyAsCupy, emulate_cuda

    if request.param == "cpu":
        return "cpu", NumpyAsCupy()
    if request.param == "emulated":
        emulate_cuda(monkeypatch, request.getfixturevalue("cuda_host"))
        return "cuda", NumpyAsCupy()
    import cupy

    return "cuda", cupy


def close(a, b, rtol):
    return float(np.abs(np.asarray(a) - b).max()) <= rtol * max(float(np.abs(b).max()), 1e-30)


@pytest.mark.parametrize("kind,form,log_scales", [(k, f, False) for k, f in layouts()]
                         + [(k, f, True) for k, f in layouts() if k in QUANT_KINDS])
def test_layout_matches_its_reference(device, kind, form, log_scales):
    name, xp = device
    t = make(kind, form, log_scales=log_scales)
    if kind in QUANT_KINDS:
        assert (t.arrays["scales"].dtype == np.uint8) == log_scales
    op = linear_op(name, t)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, K)).astype(np.float32)
    out = xp.asarray(np.full(ROWS, np.nan, np.float32))
    op.gemv(xp.asarray(x[0]), out)
    assert close(xp.asnumpy(out), reference.decode_reference(t, x[0]), 1e-5)
    # prefill: int8 activations per token or group (CPU) or float16 activations (CUDA) against
    # the float product; the float kinds run float32 on the CPU
    want = reference.linear_w8a8(t, x) if form == A8 else reference.linear(t, x)
    rtol = 1e-5 if name == "cpu" and not int8_activations(t) else 3e-2
    assert close(xp.asnumpy(op.gemm(xp.asarray(x))), want, rtol)
    ids = np.array([0, ROWS - 1, 7])
    np.testing.assert_allclose(xp.asnumpy(op.rows(ids)), t.dequantize()[ids], rtol=1e-6, atol=1e-6)


# Affine kinds with offsets (spec §4.2) instead of zeros: the dense form with a permutation and
# outliers, the sidecars that combine with offsets.
OFFSET_KINDS = sorted(k for k in QUANT_KINDS if k != "nf4")


@pytest.mark.parametrize("kind", OFFSET_KINDS)
def test_offsets_match_their_reference(device, kind):
    name, xp = device
    rng = np.random.default_rng(3)
    w = rng.standard_normal((ROWS, K)).astype(np.float32)
    t = add_outliers(add_perm(add_offsets(parse_scheme(SCHEMES[kind]).quantize("w", w), rng), rng), rng)
    assert "offsets" in t.arrays and "zeros" not in t.arrays
    op = linear_op(name, t)
    x = rng.standard_normal((12, K)).astype(np.float32)
    out = xp.asarray(np.full(ROWS, np.nan, np.float32))
    op.gemv(xp.asarray(x[0]), out)
    assert close(xp.asnumpy(out), reference.decode_reference(t, x[0]), 1e-5)
    rtol = 1e-5 if name == "cpu" and not int8_activations(t) else 3e-2
    assert close(xp.asnumpy(op.gemm(xp.asarray(x))), reference.linear(t, x), rtol)
    ids = np.array([0, ROWS - 1, 7])
    np.testing.assert_allclose(xp.asnumpy(op.rows(ids)), t.dequantize()[ids], rtol=1e-6, atol=1e-6)
