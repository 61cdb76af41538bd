"""n:m sparse weights (spec §6.3) and sidecars on the CPU: kernels/cpu/sparse.py and the fused
decode step (kernels/cpu/fused.py) against their NumPy references.

Tolerances as in test_kernels_cpu.py: float32 summation order only (1e-5 of the largest output).
The q4 GEMV runs on int8 activations and is compared with its exact model
(reference.gemv_nm_q8act_reference); against float activations on the densified weights it may
differ by the int8 rounding of x (allowed 2% of the largest output, measured ~0.5%).
"""
from __future__ import annotations

import numpy as np
import pytest

from qbin_testutil import add_fp_cols, add_outliers, add_perm
from qformat.kernels import linear_op, reference
from qformat.kernels.cpu import sparse
from qformat.schemes import Tensor, float_tensor, parse_scheme

RTOL = 1e-5
SCHEMES = ["int4-g64", "int4-g64-sym", "int4-g32", "int4-g24", "int4", "int8-g64", "int3-g32",
           "int2-g16-sym", "nf4-g64"]
PATTERNS = [(2, 4), (4, 8), (1, 4)]
# SmolLM2 widths, a partial last group (200 = 3*64 + 8), rows not a multiple of the tile, one row
SHAPES = [(37, 576), (19, 200), (1, 64)]


def close(a, b, rtol=RTOL):
    scale = max(float(np.abs(b).max()), 1e-30)
    return float(np.abs(a - b).max()) / scale <= rtol


def magnitude_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive columns (the converter's magnitude pruning)."""
    import torch

    from qformat.convert.prune import Pattern, magnitude_mask as mask_of

    return mask_of(torch.from_numpy(np.ascontiguousarray(w, np.float32)), Pattern(f"{n}:{m}", n, m)).numpy()


def make_sparse(scheme: str, rows: int, k: int, n: int, m: int, seed: int = 0) -> Tensor:
    w = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    return parse_scheme(scheme).quantize_nm("w", w, magnitude_mask(w, n, m), n, m)


def gemv_reference(t: Tensor, x: np.ndarray) -> np.ndarray:
    """What the CPU GEMV computes: int8 activations for q4, float otherwise."""
    return reference.gemv_nm_q8act_reference(t, x) if t.kind == "q4" else reference.linear(t, x)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,k", SHAPES)
def test_sparse_linear_matches_reference(scheme, n, m, rows, k):
    if parse_scheme(scheme).group_for(k) % m:
        pytest.skip("group not a multiple of m")
    t = make_sparse(scheme, rows, k, n, m)
    op = linear_op("cpu", t)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(k).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    op.gemv(x, out)
    assert close(out, gemv_reference(t, x))
    xs = rng.standard_normal((3, k)).astype(np.float32)  # below the GEMM switch: GEMV per row
    assert close(op.gemm(xs), np.stack([gemv_reference(t, row) for row in xs]))
    xs = rng.standard_normal((11, k)).astype(np.float32)  # dequantize + scatter + BLAS
    assert close(op.gemm(xs), reference.linear(t, xs))
    ids = np.array([0, rows - 1, rows // 2])
    np.testing.assert_array_equal(op.rows(ids), t.dequantize()[ids])


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("scheme", ["int4-g64", "int4-g32-sym", "nf4-g64", "int3-g32"])
def test_sparse_kernel_equals_dense_kernel_on_densified_weights(scheme, n, m):
    """The sparse kernels against the f32 dense kernel running W densified (zeros where pruned)."""
    t = make_sparse(scheme, 96, 576, n, m, seed=2)
    dense = linear_op("cpu", float_tensor("w", t.dequantize(), "f32"))
    op = linear_op("cpu", t)
    x = np.random.default_rng(3).standard_normal(576).astype(np.float32)
    got, want = np.empty(96, np.float32), np.empty(96, np.float32)
    op.gemv(x, got)
    dense.gemv(x, want)
    assert close(got, want, 2e-2 if t.kind == "q4" else RTOL)
    xs = np.random.default_rng(4).standard_normal((16, 576)).astype(np.float32)
    assert close(op.gemm(xs), dense.gemm(xs))


def test_int8_activation_error_is_small_but_nonzero():
    """The q4 GEMV really runs on rounded activations (a float kernel would match exactly)."""
    t = make_sparse("int4-g64", 64, 576, 2, 4, seed=5)
    x = np.random.default_rng(6).standard_normal(576).astype(np.float32)
    out = np.empty(64, np.float32)
    linear_op("cpu", t).gemv(x, out)
    err = np.abs(out - reference.linear(t, x)).max() / np.abs(reference.linear(t, x)).max()
    assert 1e-6 < err < 2e-2


@pytest.mark.parametrize("scheme", ["int4-g64", "nf4-g64", "int2-g16-sym"])
def test_sparse_with_every_sidecar(scheme):
    """perm (x gathered into stored order), outliers and 16-bit columns (added from x) on top of
    n:m sparsity, per-op path against the NumPy reference."""
    rng = np.random.default_rng(7)
    t = add_fp_cols(add_outliers(add_perm(make_sparse(scheme, 40, 192, 2, 4, seed=8), rng), rng), rng)
    op = linear_op("cpu", t)
    x = rng.standard_normal(192).astype(np.float32)
    out = np.empty(40, np.float32)
    op.gemv(x, out)
    assert close(out, gemv_reference(t, x))
    xs = rng.standard_normal((9, 192)).astype(np.float32)
    assert close(op.gemm(xs), reference.linear(t, xs))
    np.testing.assert_allclose(op.rows(np.arange(40)), t.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme,n,rows,k", [("int4-g64", 2, 37, 576), ("int4-g24-sym", 2, 19, 200),
                                             ("int4-g32", 1, 70, 96), ("int4-g64", 3, 33, 192)])
def test_shuffle_vnni_tiles_equal_portable_tiles(scheme, n, rows, k):
    """The AVX512 shuffle + VNNI n:4 tile kernel (kernels/cpu/nm_vnni.py) computes exactly the
    portable kernel's integer sums (skipped on CPUs without AVX512-VNNI/BW/VBMI, where only the
    portable one runs)."""
    from qformat.kernels.cpu import nm_vnni, quant
    from qformat.kernels.cpu.features import VNNI_VBMI
    from qformat.kernels.cpu.base import H2F

    if not VNNI_VBMI:
        pytest.skip("this CPU has no AVX512-VNNI/BW/VBMI")
    t = make_sparse(scheme, rows, k, n, 4, seed=3)
    lay = sparse.NmLayout(t)
    x = np.random.default_rng(4).standard_normal(k).astype(np.float32)
    xq, d, _ = quant.quantize_x(x, k, lay.group, (lay.group + 7) // 8 * 8)
    tiles = lay.codes.shape[0]
    portable, shuffled = np.empty(rows, np.float32), np.empty(rows, np.float32)
    cand = sparse.candidates(xq, k, lay.group, n, 4).astype(np.int32)
    scratch = (np.empty((2, sparse.TILE), np.int32), np.empty(sparse.TILE, np.float32))
    sparse._tiles_n4(lay.codes, lay.scales, lay.zeros, lay.has_zeros, H2F, lay.index, cand, d, 0, tiles, portable,
                     *scratch)
    nm_vnni.tiles_n4(lay.codes, lay.scales, lay.zeros, lay.has_zeros, H2F, lay.index,
                     nm_vnni.step_table(xq, k, lay.group, n), d, 0, tiles, shuffled, *scratch)
    np.testing.assert_allclose(shuffled, portable, rtol=1e-6, atol=1e-6 * float(np.abs(portable).max()))


def test_tile_layout_round_trips():
    a = np.arange(37 * 5, dtype=np.uint8).reshape(37, 5)
    tiles = sparse.tile_rows(a)
    n_tiles = -(-37 // sparse.TILE)
    assert tiles.shape == (n_tiles, 5, sparse.TILE)
    for r in range(37):
        np.testing.assert_array_equal(tiles[r // sparse.TILE, :, r % sparse.TILE], a[r])
    assert not tiles[-1, :, 37 - (n_tiles - 1) * sparse.TILE:].any()


def test_planar_index_matches_the_spec_positions():
    """Re-packed positions decode, with the codes' planar layout, to the file's positions."""
    from qformat.packing import unpack_codes
    from qformat.schemes import unpack_nm_index

    for n, m in [(2, 4), (4, 8)]:
        t = make_sparse("int4-g24", 5, 96, n, m)
        kc, gc = 96 * n // m, 24 * n // m
        got = unpack_codes(sparse.planar_index(t), kc, gc, sparse.index_bits(m))
        np.testing.assert_array_equal(got, unpack_nm_index(t.arrays["sparse_index"], kc, m))


def test_unsupported_pattern_is_refused_clearly():
    t = make_sparse("int4-g64", 4, 64, 2, 4)
    bad = Tensor(t.name, t.kind, t.shape, t.arrays, t.group_size, t.symmetric, sparsity=(2, 16))
    with pytest.raises(NotImplementedError, match="2:16"):
        linear_op("cpu", bad)


# ---------------------------------------------------------------------------- the fused decode step


def _linear_names(reader) -> list[str]:
    return [n for n in reader.names() if n.startswith("layers.") and reader[n].kind in ("q4", "q8", "q3", "q2", "nf4")]


VARIANTS = {
    # name: (scheme of the layers, n:m or None, sidecars to add)
    "perm": ("int4-g32", None, ("perm",)),
    "outliers+fp": ("int4-g32", None, ("outliers", "fp")),
    "perm-int3": ("int3-g16", None, ("perm", "outliers")),
    "2:4-q4": ("int4-g32", (2, 4), ()),
    "4:8-q4-sym": ("int4-g16-sym", (4, 8), ()),
    "2:4-nf4": ("nf4-g16", (2, 4), ()),
    "2:4-q4-all-sidecars": ("int4-g32", (2, 4), ("perm", "outliers", "fp")),
}


@pytest.fixture(scope="module")
def tiny_qbin(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_checkpoint

    from qformat.convert import convert

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("sparse-llama"), arch="llama", tied=False, seed=4)
    qbin = folder.parent / "f32.qbin"
    convert(folder, qbin, "int8", progress=False, clip_search=False)  # float source for the variants
    return qbin


def write_variant(src, dst, scheme: str, nm, sidecars, seed: int = 0):
    """A copy of `src` whose layer weights are re-quantized with `scheme` (n:m magnitude pruned
    when nm is given) and carry the given sidecars (random, valid)."""
    from qformat.reader import QbinReader
    from qformat.writer import QbinWriter

    rng = np.random.default_rng(seed)
    r = QbinReader(src)
    layers = set(_linear_names(r))
    with QbinWriter(dst) as w:
        for name in r.names():
            t = r[name]
            if t.kind == "bytes":
                w.add_bytes(name, r.raw_bytes(name))
                continue
            if name in layers:
                wf = t.dequantize()
                s = parse_scheme(scheme)
                t = s.quantize_nm(name, wf, magnitude_mask(wf, *nm), *nm) if nm else s.quantize(name, wf)
                t.arrays = dict(t.arrays)
                if "perm" in sidecars:
                    add_perm(t, rng)
                if "outliers" in sidecars:
                    add_outliers(t, rng, cols_dtype=np.uint16)
                    t.arrays["outlier_values"] = (0.05 * t.arrays["outlier_values"]).astype(np.float16)
                if "fp" in sidecars:
                    add_fp_cols(t, rng, n=2)
                    t.arrays["fp_weight"] = (0.05 * t.arrays["fp_weight"]).astype(np.float16)
            w.add_tensor(t)
        w.finish(model=r.model, tokenizer=r.tokenizer, chat_template=r.chat_template,
                 generation=r.generation, provenance=r.provenance)
    return dst


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_step_runs_sidecars_and_sparsity_like_the_per_op_path(tiny_qbin, tmp_path, variant):
    from qformat.reader import QbinReader
    from qformat.runtime.model import Transformer

    scheme, nm, sidecars = VARIANTS[variant]
    qq = write_variant(tiny_qbin, tmp_path / f"{variant}.qbin", scheme, nm, sidecars)
    r = QbinReader(qq)
    t = r["layers.0.ffn.w2"]
    assert t.sparsity == nm
    assert all({"perm": "perm", "outliers": "outlier_rowptr", "fp": "fp_cols"}[s] in t.arrays for s in sidecars)
    fused, plain = Transformer(r), Transformer(QbinReader(qq), fused=False)
    assert fused.fused is not None and plain.fused is None
    ids = [int(i) for i in np.random.default_rng(9).integers(0, fused.args.vocab_size, 12)]
    fused.forward(ids[:4], 0)
    plain.forward(ids[:4], 0)
    for pos in range(4, 12):
        a, b = fused.forward(ids[pos:pos + 1], pos), plain.forward(ids[pos:pos + 1], pos)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_fused_linear_equals_reference_with_sidecars():
    """One table row through fused.gemv_row against the NumPy reference, per sidecar."""
    from qformat.kernels.cpu import fused
    from qformat.kernels.cpu.base import H2F, ROUTINES

    rng = np.random.default_rng(10)
    cases = [
        add_perm(parse_scheme("int4-g64").quantize("w", rng.standard_normal((48, 192)).astype(np.float32)), rng),
        add_outliers(parse_scheme("int3-g32").quantize("w", rng.standard_normal((48, 192)).astype(np.float32)), rng),
        add_fp_cols(parse_scheme("nf4-g64").quantize("w", rng.standard_normal((48, 192)).astype(np.float32)), rng),
        add_fp_cols(add_outliers(add_perm(make_sparse("int4-g64", 48, 192, 2, 4), rng), rng), rng),
        add_perm(make_sparse("int8-g32", 48, 192, 4, 8), rng),
    ]
    for t in cases:
        row, keep = linear_op("cpu", t).fused_row()
        table = np.asarray([row], np.int64)
        x = rng.standard_normal(192).astype(np.float32)
        out = np.empty(48, np.float32)
        fused.gemv_row(table, 0, H2F, x, out, *(0,) * len(ROUTINES))
        want = reference.decode_reference(t, x)
        assert close(out, want), t.kind


def test_fused_step_refuses_w8a8_tensors_with_input_scale():
    t = parse_scheme("int8").quantize("w", np.ones((4, 16), np.float32))
    t = Tensor(t.name, t.kind, t.shape, dict(t.arrays, input_scale=np.ones(16, np.float32)), t.group_size,
               t.symmetric, activation={"bits": 8, "mode": "dynamic"})
    assert linear_op("cpu", t).fused_row() is None
