"""CPU kernels against their NumPy references (qformat.schemes' dequantize, kernels.reference).

"Equal up to float summation order": the kernels accumulate in float32 in another order than
NumPy (and fold zero points as s*(sum q*x - z*sum x)), so results are compared with a tolerance of
1e-5 relative to the largest output, far below any real layout or indexing mistake (those give
errors of order 1).
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile

import numpy as np
import pytest

from qformat.kernels import linear_op, reference
from qformat.kernels.cpu import gemm_vnni, ops, quant
from qformat.kernels.cpu.features import VNNI
from qformat.kernels.cpu.base import H2F
from qformat.kernels.layouts import Q8ACT_KINDS, q8act
from qformat.rope import rope_tables
from qformat.schemes import Tensor, parse_scheme

from qbin_testutil import add_fp_cols

RTOL = 1e-5
SCHEMES = ["f32", "f16", "bf16", "int8", "int8-g64", "int4-g64", "int4-g32-sym", "int4-g128",
           "int6-g64", "int6-g32-sym", "int5-g64", "int5-g128", "int3-g64", "int3-g32-sym", "int2-g64",
           "int2-g16-sym", "nf4-g64", "int4-g24"]
# (rows, k): SmolLM2-like widths with partial last groups, k not a multiple of 8, a group wider
# than the row, a single row.
SHAPES = [(37, 576), (19, 100), (5, 13), (1, 200), (64, 36)]


def close(a, b, rtol=RTOL):
    scale = max(float(np.abs(b).max()), 1e-30)
    return float(np.abs(a - b).max()) / scale <= rtol


def make(scheme, rows, k, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    return parse_scheme(scheme).quantize("w", w)


def gemv_reference(t, x):
    """What the CPU GEMV computes: int8 activations for the kinds that use them, else float."""
    return reference.decode_reference(t, x)


def gemm_reference(t, xs):
    """What the CPU prefill GEMM computes: on AVX512-VNNI CPUs int8 activations where the GEMV
    takes them (kernels/cpu/gemm_vnni.py), else dequantized rows times float activations."""
    k = t.shape[1]
    uses = VNNI and q8act(t.kind, min(t.group_size, k))
    group = gemm_vnni.act_group(t.kind, min(t.group_size, k), k) if uses else None
    if group is None:
        return reference.linear(t, xs)
    return np.stack([reference.gemv_q8act_reference(t, x, group) for x in xs])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows,k", SHAPES)
def test_linear_matches_reference(scheme, rows, k):
    t = make(scheme, rows, k)
    op = linear_op("cpu", t)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(k).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    op.gemv(x, out)
    assert close(out, gemv_reference(t, x))
    xs = rng.standard_normal((2, k)).astype(np.float32)  # below the GEMM switch: one GEMV per row
    assert close(op.gemm(xs), np.stack([gemv_reference(t, row) for row in xs]))
    xs = rng.standard_normal((19, k)).astype(np.float32)  # the GEMM
    assert close(op.gemm(xs), gemm_reference(t, xs))
    ids = np.array([0, rows - 1, rows // 2])
    np.testing.assert_array_equal(op.rows(ids), t.dequantize()[ids])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows,k", SHAPES)
@pytest.mark.parametrize("sidecars", [False, True])
def test_batched_decode_equals_gemv(scheme, rows, k, sidecars):
    """The GEMVs of a few tokens at once (batched decode: gemv_many, one pass over the weights
    where the kind has a kernel for it) give each token's GEMV: bit for bit on int8
    activations (q2-q6), so a sequence decodes alike alone or in a batch."""
    rng = np.random.default_rng(2)
    t = make(scheme, rows, k)
    if sidecars and t.kind not in ("f32", "f16", "bf16"):
        t = with_sidecars(t, rng)
    op = linear_op("cpu", t)
    # bit for bit where the batched kernel is exact by construction (integer group sums, float
    # parts in program order); elsewhere gemv_many is the GEMV loop itself, whose vectorized
    # float sums (and the 16-bit columns' BLAS) were seen to round differently between calls
    exact = t.kind in Q8ACT_KINDS and q8act(t.kind, min(t.group_size, k))
    for n in (2, 5, 9):
        xs = rng.standard_normal((n, k)).astype(np.float32)
        alone = np.empty((n, rows), np.float32)
        for i in range(n):
            op.gemv(xs[i], alone[i])
        if exact:
            np.testing.assert_array_equal(op.gemv_many(xs), alone)
        else:
            assert close(op.gemv_many(xs), alone)


def with_sidecars(t: Tensor, rng) -> Tensor:
    """Add a permutation, CSR outliers and 16-bit columns to a quantized tensor."""
    rows, k = t.shape
    arrays = dict(t.arrays)
    arrays["perm"] = rng.permutation(k).astype(np.int32)
    counts = rng.integers(0, 3, rows)
    arrays["outlier_rowptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    arrays["outlier_cols"] = rng.integers(0, k, counts.sum()).astype(np.int32)
    arrays["outlier_values"] = rng.standard_normal(counts.sum()).astype(np.float16)
    return add_fp_cols(Tensor(t.name, t.kind, t.shape, arrays, t.group_size, t.symmetric), rng)


@pytest.mark.parametrize("scheme,rows,k", [("int4-g64", 37, 576), ("int4-g128", 19, 4160), ("int4-g64-sym", 5, 200),
                                           ("int4-g128", 7, 576), ("int6-g64", 9, 576), ("int5-g128", 9, 576),
                                           ("int3-g64-sym", 9, 200), ("int2-g128", 9, 4160)])
def test_vnni_rows_equal_portable_rows(scheme, rows, k):
    """The AVX512-VNNI row kernel (kernels/cpu/group_vnni.py) gives the portable kernels' sums up
    to float rounding order, a partial last group of 64k columns included (skipped on CPUs
    without AVX512-VNNI/BW)."""
    from qformat.kernels.cpu import group_vnni
    from qformat.kernels.cpu.features import VNNI_BW

    if not VNNI_BW:
        pytest.skip("this CPU has no AVX512-VNNI/BW")
    t = make(scheme, rows, k, seed=6)
    group = min(t.group_size, k)
    bits = {"q2": 2, "q3": 3, "q4": 4, "q5": 5, "q6": 6}[t.kind]
    x = np.random.default_rng(7).standard_normal(k).astype(np.float32)
    xq, d, sums = quant.quantize_x(x, k, group, group)
    a = t.arrays
    args = (a["codes"], a["scales"].view(np.uint16), a.get("zeros", np.zeros((1, 1), np.uint8)), "zeros" in a, H2F)
    portable, wide = np.zeros(rows, np.float32), np.empty(rows, np.float32)
    quant._groups_q8act(*args, xq, d, sums, k, group, bits, 0, 0, rows, portable)
    done = group_vnni.rows(*args, xq, d, sums, k, group, bits, 0, rows, wide)
    if done < -(-k // group):
        quant._groups_q8act(*args, xq, d, sums, k, group, bits, done, 0, rows, wide)
    assert close(wide, portable, 1e-6)
    assert close(wide, reference.gemv_q8act_reference(t, x), 1e-5)


@pytest.mark.parametrize("scheme,k,agroup", [("int4-g64", 576, 64), ("int4-g32-sym", 200, 32), ("int4-g128", 1000, 128),
                                              ("int8", 576, 64), ("int8", 100, 64), ("int8-g128-sym", 320, 64),
                                              ("int8-g32", 96, 32)])
@pytest.mark.parametrize("n", [1, 9, 21])
def test_vnni_gemm_matches_reference(scheme, k, agroup, n):
    """kernels/cpu/gemm_vnni.py (q4 and q8 codes times int8 activations, 16-row blocks, 8-token
    tiles) against the NumPy model of its integers, for rows and tokens that fill no block or
    tile, partial last groups, a zero token and a zero group (skipped without AVX512-VNNI)."""
    if not VNNI:
        pytest.skip("this CPU has no AVX512-VNNI")
    rows = 53
    t = make(scheme, rows, k, seed=8)
    group = min(t.group_size, k)
    assert gemm_vnni.act_group(t.kind, group, k) == agroup
    xs = np.random.default_rng(9).standard_normal((n, k)).astype(np.float32) * 3
    xs[0, :agroup] = 0.0
    if n > 1:
        xs[1] = 0.0
    a = t.arrays
    out = gemm_vnni.gemm_q8act(a["codes"], a["scales"].view(np.uint16), a.get("zeros", np.zeros((1, 1), np.uint8)),
                               "zeros" in a, H2F, {"q4": 4, "q8": 8}[t.kind], k, group, agroup, xs)
    assert close(out, np.stack([reference.gemv_q8act_reference(t, x, agroup) for x in xs]), 1e-6)


def test_int8_activations_skip_16bit_columns():
    """A ×100 channel kept in 16 bits (LLM.int8()) does not coarsen its group's int8 activation
    codes: the q4 GEMV zeroes it before quantizing, so it matches float activations closely."""
    rng = np.random.default_rng(5)
    t = add_fp_cols(make("int4-g64", 64, 256), rng, n=2)
    x = rng.standard_normal(256).astype(np.float32)
    x[t.arrays["fp_cols"]] *= 100.0
    out = linear_op("cpu", t).gemv(x, np.empty(64, np.float32))
    exact = reference.linear(t, x[None])[0]
    assert close(out, gemv_reference(t, x))
    unzeroed = dict(t.arrays)
    unzeroed.pop("fp_cols"), unzeroed.pop("fp_weight")
    plain = Tensor(t.name, t.kind, t.shape, unzeroed, t.group_size, t.symmetric)  # outlier inside the groups
    coarse = gemv_reference(plain, x) + t.arrays["fp_weight"].astype(np.float32) @ x[t.arrays["fp_cols"]]
    err, err_coarse = (np.linalg.norm(y - exact) / np.linalg.norm(exact) for y in (out, coarse))
    assert err < 0.01 < err_coarse and err < err_coarse / 10


@pytest.mark.parametrize("scheme", ["int4-g32", "int8", "nf4-g64"])
def test_sidecars_match_reference(scheme):
    rng = np.random.default_rng(2)
    t = with_sidecars(make(scheme, 23, 100), rng)
    op = linear_op("cpu", t)
    x = rng.standard_normal(100).astype(np.float32)
    out = np.empty(23, np.float32)
    op.gemv(x, out)
    assert close(out, gemv_reference(t, x))
    xs = rng.standard_normal((20, 100)).astype(np.float32)
    assert close(op.gemm(xs), gemm_reference(t, xs))
    ids = np.array([0, 5, 22])
    assert close(op.rows(ids), t.dequantize()[ids], 1e-6)


@pytest.mark.parametrize("k,group", [(576, 32), (100, 64), (13, 32), (200, 200), (50, 20)])
def test_activation_quantization_matches_reference(k, group):
    """The kernel's int8 activations equal the NumPy model exactly (codes, scales, code sums)."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(k) * rng.choice([1e-3, 1.0, 40.0], k)).astype(np.float32)
    x[:min(k, group)] = 0.0  # an all-zero group: scale 0, codes 0
    x[-1] = 0.5 * np.abs(x[-group:]).max()  # ties and near-ties to even
    padded = (group + 7) // 8 * 8
    xq, d, sums = quant.quantize_x(x, k, group, padded)
    q, d_ref = reference.quantize_activations(x, group)
    np.testing.assert_array_equal(d, d_ref)
    cols = np.arange(k)
    expect = np.zeros(xq.shape, np.int64)  # group g's codes at row g, zeros in every padding slot
    expect[cols // group, cols % group] = q
    np.testing.assert_array_equal(xq, expect)
    np.testing.assert_array_equal(sums, np.bincount(cols // group, weights=q).astype(np.int32))


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64-sym", "int4-g24", "int4-g128"])
def test_int8_activation_gemv_stays_close_to_float(scheme):
    """Rounding x to int8 per group moves W @ x by well under 2% of its largest entry (measured
    ~0.5% on Gaussian data): a bound on the decode path's error, independent of summation order."""
    t = make(scheme, 64, 576)
    x = np.random.default_rng(9).standard_normal(576).astype(np.float32)
    out = np.empty(64, np.float32)
    linear_op("cpu", t).gemv(x, out)
    ref = reference.linear(t, x)
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    assert 0 < err < 2e-2


def test_missing_kernel_names_device_and_kind():
    t = Tensor("tok", "bytes", (4,), {"data": np.zeros(4, np.uint8)})
    with pytest.raises(NotImplementedError, match=r"cpu.*'bytes'"):
        linear_op("cpu", t)


def test_sparse_tensor_runs_the_sparse_op():
    """n:m sparse tensors run kernels/cpu/sparse.py (tested in test_kernels_sparse.py)."""
    from qformat.kernels.cpu.sparse import SparseGroupQuantOp

    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    mask = np.zeros((4, 64), bool)
    mask[:, ::2] = True
    t = parse_scheme("int4-g32").quantize_nm("w", w, mask, 2, 4)
    assert isinstance(linear_op("cpu", t), SparseGroupQuantOp)


def test_f16_gemv_handles_subnormals_and_extremes():
    w = np.array([[6e-8, -6e-8, 65504.0, -65504.0, 0.0, -0.0, 1e-5, 3.0]], np.float16)
    t = Tensor("w", "f16", w.shape, {"data": w})
    x = np.arange(1, 9, dtype=np.float32)
    out = np.empty(1, np.float32)
    linear_op("cpu", t).gemv(x, out)
    assert close(out, w.astype(np.float32) @ x, 1e-6)


# ---------------------------------------------------------------------------- small ops

def test_rmsnorm_rope_silu():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 48)).astype(np.float32)
    w = rng.standard_normal(48).astype(np.float32)
    out = np.empty_like(x)
    ops.rmsnorm(x, w, 1e-5, out)
    assert close(out, reference.rmsnorm(x, w, 1e-5))
    q = rng.standard_normal((5, 3, 16)).astype(np.float32)
    cos, sin = rope_tables(np.linspace(1, 0.01, 8).astype(np.float32), 5)
    expect = reference.rope(q, cos, sin)
    ops.rope(q, cos, sin)
    assert close(q, expect)
    part = q.copy()  # a partial rotary: the first 10 of 16 dims
    expect = reference.rope(part, cos[:, :5], sin[:, :5])
    ops.rope(part, cos[:, :5], sin[:, :5])
    assert close(part, expect) and np.array_equal(part[..., 10:], q[..., 10:])
    # every gated activation the model may name (config.ACTIVATIONS), and the soft cap
    from qformat.config import ACTIVATIONS
    from qformat.kernels.cpu.device import GLU, CPUOps

    assert set(GLU) == set(reference.GLU) == set(ACTIVATIONS)
    for activation in GLU:
        g, u = x.copy() * 3, rng.standard_normal((5, 48)).astype(np.float32)
        expect = reference.GLU[activation](g, u)
        CPUOps().glu(activation, g, u)
        assert close(g, expect), activation
    y = x * 20
    expect = reference.softcap(y, 7.0)
    CPUOps().softcap(y, 7.0)
    assert close(y, expect)
    gate = rng.standard_normal((5, 1)).astype(np.float32) * 4  # a shared expert's gated add
    out = y.copy()
    CPUOps().sigmoid_gate_add(out, x, gate)
    assert close(out, y + reference.sigmoid_gate(x, gate))


@pytest.mark.parametrize("window,cap", [(None, None), (4, None), (None, 1.5), (4, 1.5)])
def test_attention_matches_reference(window, cap):
    rng = np.random.default_rng(4)
    n_heads, n_kv, hd, start, n = 6, 2, 16, 7, 5
    q = rng.standard_normal((n, n_heads, hd)).astype(np.float32)
    k = rng.standard_normal((start + n, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((start + n, n_kv, hd)).astype(np.float32)
    expect = reference.attention(q, k, v, start, window, 0.25, cap)
    assert close(ops.attention_prefill(q, k, v, start, window, 0.25, cap), expect)
    # decode: the last queries of two sequences, their positions in shuffled slots of one pool
    total = start + n
    k2, v2 = rng.standard_normal((2, total, n_kv, hd)).astype(np.float32)
    q2 = rng.standard_normal((n, n_heads, hd)).astype(np.float32)
    slots = rng.permutation(2 * total).astype(np.int32).reshape(2, total)
    pool_k, pool_v = np.empty((2 * total, n_kv, hd), np.float32), np.empty((2 * total, n_kv, hd), np.float32)
    pool_k[slots[0]], pool_v[slots[0]], pool_k[slots[1]], pool_v[slots[1]] = k, v, k2, v2
    pos = total - 1
    lo = 0 if window is None else max(0, pos + 1 - window)
    out = np.empty((2, n_heads, hd), np.float32)
    ops.attention_decode(np.stack([q[-1], q2[-1]]), pool_k, pool_v, slots, np.array([lo, lo]),
                         np.array([total, total]), np.float32(0.25), np.float32(cap or 0), out)
    assert close(out[0], expect[-1])
    assert close(out[1], reference.attention(q2, k2, v2, start, window, 0.25, cap)[-1])


def test_cache_dir_falls_back_when_package_and_home_are_read_only(tmp_path, monkeypatch):
    from qformat.kernels.cpu.cache import cache_dir, sources_key

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "kernel.py").write_text("x = 1\n")
    key = sources_key(pkg)
    assert cache_dir(pkg) == pkg / "__pycache__" / "numba" / key
    # a regular file where a folder would go: unwritable even to root, which ignores permissions
    shutil.rmtree(pkg / "__pycache__")
    (pkg / "__pycache__").write_text("")
    assert cache_dir(pkg) == tmp_path / "xdg" / "qformat" / "numba" / key
    (tmp_path / "ro-home").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro-home"))
    private = tmp_path / "tmp" / f"qformat-numba-{os.getuid()}"
    assert cache_dir(pkg) == private / key and private.stat().st_mode & 0o777 == 0o700
    private.chmod(0o777)  # shared with others: someone could plant compiled code there
    with pytest.raises(RuntimeError, match="no writable folder for the compiled kernels .*set NUMBA_CACHE_DIR"):
        cache_dir(pkg)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir(pkg) is None  # the user's choice wins
    (pkg / "kernel.py").write_text("x = 2\n")
    assert sources_key(pkg) != key  # an edited kernel gets a fresh cache


def test_checked_cache_entries_are_bound_to_their_key_and_bytes():
    from qformat.kernels.cpu.cache import seal, unseal

    key = (("float32", "int64"), ("x86_64", "haswell", ""), ("abc", "def"))
    sealed = seal(b"payload", key)
    assert unseal(sealed, key) == b"payload"
    assert unseal(sealed, key[:2]) is None  # another signature's entry
    assert unseal(b"payload", key) is None  # plain numba's (or a truncated) entry
    for i in range(len(sealed)):
        flipped = bytearray(sealed)
        flipped[i] ^= 1
        assert unseal(bytes(flipped), key) is None
    assert pickle.loads(seal(pickle.dumps([1, 2]), key)) == [1, 2]  # numba reads it


def test_checked_cache_file_misses_on_damage_and_skips_failed_saves(tmp_path, capsys):
    from qformat.kernels.cpu.cache import checked_cache_file

    cache = checked_cache_file()(str(tmp_path), "f-1.py311", source_stamp=(1.0, 10))
    cache.save(("sig", 1), {"code": b"\x00" * 64})
    cache.save(("sig", 2), {"code": b"\x01" * 64})
    assert cache.load(("sig", 1)) == {"code": b"\x00" * 64} and cache.load(("sig", 3)) is None
    one, two = sorted(tmp_path.glob("*.nbc"))
    one.write_bytes(two.read_bytes())  # the index names another signature's code: a miss, not it
    assert cache.load(("sig", 1)) is None and cache.load(("sig", 2)) == {"code": b"\x01" * 64}
    index = tmp_path / "f-1.py311.nbi"
    index.write_bytes(index.read_bytes()[:-5])
    assert cache.load(("sig", 2)) is None
    (tmp_path / "file").write_text("")
    unwritable = checked_cache_file()(str(tmp_path / "file" / "sub"), "f-1.py311", source_stamp=(1.0, 10))
    checked_cache_file().warned = False
    unwritable.save(("sig", 1), {"code": b""})  # a full or read-only disk: no error, one line
    assert "cannot save a compiled kernel" in capsys.readouterr().err
