"""The clip-ratio search of convert/rtn.py against brute force through the format core."""
from __future__ import annotations

import numpy as np
import pytest

from qformat.constants import NF4_LEVELS
from qformat.convert import rtn
from qformat.schemes import parse_scheme

SCHEMES = ["int8", "int8-g128", "int4-g64", "int4-g32-sym", "int3-g128", "int2-g64", "nf4-g64"]


def weights(rows=24, k=200, seed=0, outliers=True):
    """Gaussian weights (k not a multiple of 32, 64 or 128) with a few planted outliers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32) * 0.02
    if outliers:
        idx = rng.integers(0, rows * k, size=rows)
        w.flat[idx] *= 12
    return w


def group_sq_err(t, w, group):
    err = (t.dequantize() - w) ** 2
    k = w.shape[1]
    return np.stack([err[:, s:s + group].sum(axis=1) for s in range(0, k, group)], axis=1)


def test_nf4_codes_are_nearest_levels():
    x = np.random.default_rng(1).uniform(-1.3, 1.3, 100_000).astype(np.float32)
    x = np.concatenate([x, NF4_LEVELS, (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2 + 1e-6])
    want = np.abs(np.clip(x, -1, 1)[:, None] - NF4_LEVELS).argmin(axis=1)
    np.testing.assert_array_equal(rtn.nf4_codes(x), want)


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_plain_error_matches_the_core(scheme_name):
    scheme = parse_scheme(scheme_name)
    w = weights()
    group = scheme.group_for(w.shape[1])
    _, plain = rtn.search_clip(w, scheme)
    np.testing.assert_allclose(plain, group_sq_err(scheme.quantize("w", w), w, group), rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_search_finds_the_best_ratio_of_the_grid(scheme_name):
    scheme = parse_scheme(scheme_name)
    w = weights(seed=2)
    group = scheme.group_for(w.shape[1])
    brute = np.stack([group_sq_err(scheme.quantize("w", w, clip=float(r)), w, group) for r in rtn.CLIP_GRID])
    ratios, _ = rtn.search_clip(w, scheme)
    chosen = group_sq_err(scheme.quantize("w", w, clip=ratios), w, group)
    np.testing.assert_allclose(chosen, brute.min(axis=0), rtol=1e-4, atol=1e-10)
    assert np.all(chosen <= brute[0] * (1 + 1e-6))


@pytest.mark.parametrize("scheme_name", ["int4-g64", "nf4-g64", "int8"])
def test_blocks_concatenate_to_the_whole(monkeypatch, scheme_name):
    scheme = parse_scheme(scheme_name)
    w = weights(rows=37, k=150, seed=3)
    whole, stats_whole = rtn.quantize_weight("w", w, scheme)
    monkeypatch.setattr(rtn, "BLOCK_ELEMENTS", 150 * 5)  # 5 rows per block, the last one partial
    blocked, stats_blocked = rtn.quantize_weight("w", w, scheme)
    assert whole.arrays.keys() == blocked.arrays.keys()
    for role in whole.arrays:
        np.testing.assert_array_equal(whole.arrays[role], blocked.arrays[role])
    assert stats_whole.sq_err == pytest.approx(stats_blocked.sq_err, rel=1e-7)
    ratios, _ = rtn.search_clip(w, scheme)
    direct = scheme.quantize("w", w, clip=ratios)
    for role in whole.arrays:
        np.testing.assert_array_equal(whole.arrays[role], direct.arrays[role])


def test_clip_search_helps_with_outliers_and_reports_honestly():
    w = weights(rows=64, k=256, seed=4)
    t, stats = rtn.quantize_weight("w", w, parse_scheme("int3-g128"))
    assert stats.rel_mse < 0.9 * stats.rel_mse_minmax
    measured = float(((t.dequantize() - w) ** 2).sum())
    assert stats.sq_err == pytest.approx(measured, rel=1e-6)


def test_zero_rows_and_constant_groups():
    w = weights(rows=8, k=96, outliers=False)
    w[0] = 0.0
    w[1, :64] = 0.5
    for name in SCHEMES:
        t, stats = rtn.quantize_weight("w", w, parse_scheme(name))
        deq = t.dequantize()
        assert np.isfinite(deq).all() and np.isfinite(stats.sq_err)
        np.testing.assert_array_equal(deq[0], 0.0)
