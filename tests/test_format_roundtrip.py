"""Writer -> reader round trips: every dtype, kind and sidecar, metadata, compatibility rules,
and zero-copy views. Dequantization is checked against qbin_testutil.ref_dequantize, an
independent implementation of spec/qbin.md §4-§6."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbin_testutil import (
    TOKENIZER_BYTES, add_fp_cols, add_offsets, add_outliers, add_perm, array_entry, metadata, model_args, read_raw,
    ref_dequantize, rewrite_header, sparse_2of4, write_raw, write_sample,
)
from qformat import QbinError, QbinReader, QbinWriter, Tensor, parse_scheme
from qformat.constants import DTYPES, NF4_LEVELS
from qformat.schemes import KINDS, bf16_to_f32, f32_to_bf16, quantize_rtn, xz_tensor


def _write(path, *tensors, **finish):
    with QbinWriter(path) as w:
        for t in tensors:
            w.add_tensor(t)
        w.finish(**{"model": model_args(), **finish})
    return path


def _assert_same_tensor(got: Tensor, want: Tensor):
    assert (got.kind, got.shape, got.group_size, got.symmetric, got.sparsity) == \
        (want.kind, tuple(want.shape), want.group_size, want.symmetric, want.sparsity)
    assert list(got.arrays) == list(want.arrays)
    for role, arr in want.arrays.items():
        assert got.arrays[role].dtype == np.asarray(arr).dtype.newbyteorder("<"), role
        np.testing.assert_array_equal(got.arrays[role], arr, err_msg=role)


# ---------------------------------------------------------------------------- dtypes


def test_every_storable_dtype_round_trips(tmp_path):
    """f32, f16, bf16 (data), u8 (bytes, codes), u16 (outlier_cols), i32 (perm, rowptr, fp_cols)."""
    path, written = write_sample(tmp_path / "m.qbin")
    with QbinReader(path, verify=True) as r:
        seen = set()
        for name, t in written.items():
            _assert_same_tensor(r[name], t)
            seen |= {a["dtype"] for a in r.array_entries(name).values()}
        assert r.raw_bytes("tokenizer") == TOKENIZER_BYTES
    assert seen == {"f32", "f16", "bf16", "u8", "u16", "i32"}


@pytest.mark.parametrize("dtype", ["i8", "i16", "u32", "i64"])
def test_dtypes_without_a_role_are_refused_both_ways(tmp_path, dtype):
    """No v1 role uses i8, i16, u32 or i64: the writer refuses them and so does the reader."""
    np_dtype = DTYPES[dtype]
    t = parse_scheme("int4-g16").quantize("w", np.ones((4, 16), np.float32))
    t.arrays["perm"] = np.arange(16).astype(np_dtype)
    with pytest.raises(ValueError, match=f"perm: dtype {dtype}"):
        _write(tmp_path / "w.qbin", t)
    assert not (tmp_path / "w.qbin").exists()
    data = np.arange(4).astype(np_dtype)
    header = {"model": {}, "tensors": {"x": {"kind": "f32", "layout": 1, "shape": [4],
                                             "arrays": {"data": array_entry(data, dtype, 0)}}}}
    with pytest.raises(QbinError, match=f"dtype {dtype}"):
        QbinReader(write_raw(tmp_path / "r.qbin", header, data.tobytes()))


def test_dtype_table_matches_the_spec():
    sizes = {"f32": 4, "f16": 2, "bf16": 2, "i8": 1, "u8": 1, "i16": 2, "u16": 2, "i32": 4, "u32": 4, "i64": 8}
    assert {k: v.itemsize for k, v in DTYPES.items()} == sizes
    assert all(v.byteorder in "<|=" and (v.byteorder != "=" or np.little_endian) for v in DTYPES.values())


# ---------------------------------------------------------------------------- stored files


def test_xz_file_round_trips_and_is_smaller(tmp_path):
    """An xz tensor stores the file compressed and hands it back byte for byte."""
    data = b"".join(b'"token_%d": %d,' % (i, i) for i in range(5000))
    t = xz_tensor("tokenizer", data)
    assert t.shape == (len(data),) and t.nbytes < len(data) / 4
    with QbinReader(_write(tmp_path / "m.qbin", t), verify=True) as r:
        assert r["tokenizer"].kind == "xz" and r.raw_bytes("tokenizer") == data


@pytest.mark.parametrize("case, match", [
    ("garbled", r"corrupted xz stream"),
    ("longer", r"decodes to less than the \d+ bytes"),
    ("shorter", r"decodes to more than the \d+ bytes"),
    ("not_a_file", r"not a stored file"),
])
def test_corrupted_xz_file_is_refused(tmp_path, case, match):
    """A stream that does not decode to exactly its recorded length is named, never trusted; the
    reader decodes at most one byte past the recorded length."""
    data = bytes(range(256)) * 64
    t = xz_tensor("tokenizer", data)
    packed = t.arrays["data"].copy()
    if case == "garbled":
        packed[len(packed) // 2] ^= 0xFF
        t = Tensor("tokenizer", "xz", t.shape, {"data": packed})
    elif case in ("longer", "shorter"):
        t = Tensor("tokenizer", "xz", (len(data) + (7 if case == "longer" else -7),), {"data": packed})
    else:
        t = Tensor("tokenizer", "f32", (4,), {"data": np.zeros(4, np.float32)})
    with QbinReader(_write(tmp_path / "m.qbin", t), verify=True) as r:
        with pytest.raises(QbinError, match=match):
            r.raw_bytes("tokenizer")


# ---------------------------------------------------------------------------- offsets (§4.2)


def test_offsets_round_trip_and_match_the_spec(tmp_path):
    rng = np.random.default_rng(5)
    t = add_offsets(parse_scheme("int4-g32").quantize("w", rng.standard_normal((6, 80)).astype(np.float32)), rng)
    with QbinReader(_write(tmp_path / "m.qbin", t), verify=True) as r:
        got = r["w"]
        assert "offsets" in got.arrays and "zeros" not in got.arrays
        np.testing.assert_array_equal(got.dequantize(), ref_dequantize(t))


@pytest.mark.parametrize("clash, match", [
    ("zeros", r"do not combine with zeros"),
    ("sparsity", r"do not combine with n:m sparsity"),
    ("fp_cols", r"do not combine with 16-bit columns"),
    ("symmetric", r"array role 'offsets' is not defined"),
])
def test_offsets_refuse_what_they_do_not_combine_with(tmp_path, clash, match):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    if clash == "sparsity":
        mask = np.zeros(w.shape, bool)
        mask[:, ::2] = True
        t = parse_scheme("int4-g32").quantize_nm("w", w, mask, 2, 4)
        t.arrays["offsets"] = np.zeros(t.arrays["zeros"].shape, np.float16)
        del t.arrays["zeros"]
    elif clash == "symmetric":
        t = parse_scheme("int4-g32-sym").quantize("w", w)
        t.arrays["offsets"] = np.zeros(t.arrays["scales"].shape, np.float16)
    else:
        t = add_offsets(parse_scheme("int4-g32").quantize("w", w), rng)
        if clash == "zeros":
            t.arrays["zeros"] = np.zeros(t.arrays["scales"].shape, np.uint8)
        else:
            t = add_fp_cols(t, rng)
    with pytest.raises(ValueError, match=match):
        _write(tmp_path / "m.qbin", t)


# ---------------------------------------------------------------------------- quantized kinds

CASES = [  # (kind, group, symmetric, rows, k)
    (kind, group, sym, rows, k)
    for kind in ("q8", "q6", "q5", "q4", "q3", "q2", "nf4")
    for sym in ((True,) if kind == "nf4" else (False, True))
    for group, rows, k in ((32, 5, 96), (24, 3, 50), (64, 4, 40), (None, 3, 72))  # full, partial, k<G, per-channel
]


@pytest.mark.parametrize(("kind", "group", "sym", "rows", "k"), CASES)
def test_quantized_kind_round_trip(tmp_path, kind, group, sym, rows, k):
    rng = np.random.default_rng(zlib.crc32(repr((kind, group, sym, k)).encode()))
    w = rng.standard_normal((rows, k)).astype(np.float32) * 0.05
    t = quantize_rtn("layers.0.ffn.w1", w, KINDS[kind], group or k, sym)
    assert ("zeros" in t.arrays) == (kind != "nf4" and not sym)
    with QbinReader(_write(tmp_path / "q.qbin", t)) as r:
        got = r["layers.0.ffn.w1"]
        _assert_same_tensor(got, t)
        deq = got.dequantize()
        np.testing.assert_allclose(deq, ref_dequantize(got), rtol=1e-6, atol=1e-7)
        # round to nearest: the error is at most half a step (plus the f16 rounding of the scale)
        g = np.arange(k) // (group or k)
        s = got.arrays["scales"].astype(np.float32)[:, g]
        step = s * (np.diff(NF4_LEVELS).max() if kind == "nf4" else 1.0)  # widest gap between levels
        bits = {"q8": 8, "q6": 6, "q5": 5, "q4": 4, "q3": 3, "q2": 2, "nf4": 4}[kind]
        assert np.all(np.abs(deq - w) <= step * (0.5 + (1 << bits) / 1024) + 1e-6)


def test_sidecars_round_trip_and_dequantize(tmp_path):
    rng = np.random.default_rng(3)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    tensors = [
        add_perm(parse_scheme("int4-g16").quantize("a", w(6, 48)), rng),
        add_outliers(parse_scheme("int3-g24-sym").quantize("b", w(7, 50)), rng, per_row=3),
        add_outliers(parse_scheme("nf4-g16").quantize("c", w(5, 40)), rng, cols_dtype=np.uint16),
        add_fp_cols(parse_scheme("int8").quantize("d", w(4, 33)), rng, n=4),
        add_fp_cols(add_outliers(add_perm(parse_scheme("int2-g8").quantize("e", w(5, 20)), rng), rng), rng),
        sparse_2of4("f", 6, 64, 16, "q4", False, rng),
        sparse_2of4("g", 3, 32, 32, "q8", True, rng),
    ]
    tensors[0].arrays["input_scale"] = rng.uniform(0.5, 2, 48).astype(np.float32)
    with QbinReader(_write(tmp_path / "s.qbin", *tensors), verify=True) as r:
        for t in tensors:
            got = r[t.name]
            _assert_same_tensor(got, t)
            np.testing.assert_allclose(got.dequantize(), ref_dequantize(got), rtol=1e-5, atol=1e-6,
                                       err_msg=t.name)


def test_sparse_2of4_places_values_in_their_blocks(tmp_path):
    rng = np.random.default_rng(4)
    t = sparse_2of4("f", 2, 16, 16, "q8", False, rng)
    deq = t.dequantize()
    assert np.all((deq.reshape(2, -1, 4) != 0).sum(-1) <= 2)
    np.testing.assert_allclose(deq, ref_dequantize(t), rtol=1e-6)


def test_sidecar_must_come_complete(tmp_path):
    t = parse_scheme("int4-g16").quantize("x", np.ones((2, 16), np.float32))
    t.arrays["outlier_rowptr"] = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="outlier sidecar needs all"):
        _write(tmp_path / "x.qbin", t)
    t = parse_scheme("int4-g16-sym").quantize("x", np.ones((2, 16), np.float32))
    t.arrays["zeros"] = np.zeros((2, 1), np.uint8)  # symmetric: zero-point is implied, not stored
    with pytest.raises(ValueError, match="zeros"):
        _write(tmp_path / "y.qbin", t)


# ---------------------------------------------------------------------------- bf16


def _torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_f32_to_bf16_is_round_to_nearest_even(bit_patterns):
    x = np.array(bit_patterns, np.uint32).view(np.float32)
    got = f32_to_bf16(x)
    want = _torch_bf16_bits(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all(np.isnan(bf16_to_f32(got[nan])))


def test_bf16_hand_cases():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F7FFFFF, 0x7F7FFFFF, 0x7F800000, 0xFF800000,
                     0x80000000, 0x00000001, 0x7FC00000, 0xFFFFFFFF, 0x7F800001], np.uint32)
    got = f32_to_bf16(bits.view(np.float32))
    # tie->even down, tie->even up, above tie, carry into exponent, overflow->inf, inf, -inf,
    # -0, tiny subnormal -> 0, quiet NaN, negative NaN, signalling NaN (stays NaN, never inf)
    assert got[:9].tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80, 0x7F80, 0xFF80, 0x8000, 0x0000]
    assert np.all(np.isnan(bf16_to_f32(got[9:])))


def test_bf16_tensor_round_trip(tmp_path):
    x = np.array([[1.0, -2.5, np.inf, -np.inf], [np.nan, 3.0e38, 1e-40, 0.1]], np.float32)
    t = parse_scheme("bf16").quantize("x", x)
    with QbinReader(_write(tmp_path / "b.qbin", t)) as r:
        back = r["x"].dequantize()
    np.testing.assert_array_equal(back[0], x[0])
    assert np.isnan(back[1, 0])
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())


# ---------------------------------------------------------------------------- metadata and compatibility


def test_header_metadata_round_trip(tmp_path):
    meta = metadata()
    path, _ = write_sample(tmp_path / "m.qbin")
    with QbinReader(path) as r:
        assert r.model == meta["model"]
        assert r.model.rope_scaling.kind == "llama3" and r.model.eos_token_ids == [2, 3]
        assert r.tokenizer == meta["tokenizer"]
        assert r.tokenizer.selftest[0].ids == [5, 6]
        assert r.chat_template == meta["chat_template"]
        assert r.generation == meta["generation"]
        assert r.provenance == meta["provenance"]
        assert r.version == (1, 0)


def test_defaults_when_optional_sections_are_absent(tmp_path):
    t = parse_scheme("f32").quantize("norm", np.ones(4, np.float32))
    with QbinReader(_write(tmp_path / "d.qbin", t)) as r:
        assert r.tokenizer is None and r.chat_template is None
        assert r.generation.temperature is None and r.provenance.source == ""


def test_unknown_keys_of_a_known_major_are_ignored(tmp_path):
    path, written = write_sample(tmp_path / "m.qbin")

    def add_future_keys(h):
        h["future_section"] = {"anything": [1, 2]}
        h["model"]["future_flag"] = True
        h["model"]["rope_scaling"]["future_param"] = 3
        h["tokenizer"]["future"] = "x"
        h["tokenizer"]["selftest"][0]["future"] = 1
        h["generation"]["future_sampler"] = 0.5
        h["provenance"]["future"] = "y"
        entry = h["tensors"]["tok_embeddings"]
        entry["future_layout_hint"] = "z"
        entry["arrays"]["codes"]["future"] = 7

    rewrite_header(path, add_future_keys, out=tmp_path / "future.qbin", minor=9)
    meta = metadata()
    with QbinReader(tmp_path / "future.qbin", verify=True) as r:
        assert r.version == (1, 9)
        assert r.model == meta["model"] and r.tokenizer == meta["tokenizer"]
        assert r.generation == meta["generation"] and r.provenance == meta["provenance"]
        _assert_same_tensor(r["tok_embeddings"], written["tok_embeddings"])


def test_unknown_major_is_refused(tmp_path):
    path, _ = write_sample(tmp_path / "m.qbin")
    rewrite_header(path, lambda h: None, major=2)
    with pytest.raises(QbinError, match=r"version 2\.0 is not supported.*reads 1\.x"):
        QbinReader(path)


def test_rewrite_helper_is_faithful(tmp_path):
    """The identity rewrite reproduces the writer's bytes, so the tests above change one thing only."""
    path, _ = write_sample(tmp_path / "m.qbin")
    before = path.read_bytes()
    rewrite_header(path, lambda h: None, out=tmp_path / "same.qbin")
    pre, header, _ = read_raw(path)
    assert (pre["major"], pre["minor"]) == (1, 0) and "tensors" in header
    assert (tmp_path / "same.qbin").read_bytes() == before


# ---------------------------------------------------------------------------- zero copy


def test_views_are_zero_copy_and_read_only(tmp_path):
    path, written = write_sample(tmp_path / "m.qbin")
    with QbinReader(path) as r:
        whole = np.frombuffer(r._map, np.uint8)  # the map itself
        for name in written:
            for role, view in r[name].arrays.items():
                assert not view.flags.writeable and not view.flags.owndata, (name, role)
                assert np.shares_memory(view, whole), (name, role)
                with pytest.raises(ValueError):
                    view.reshape(-1)[:1] = 0
                base = view
                while isinstance(base, np.ndarray) and base.base is not None:
                    base = base.base
                if isinstance(base, memoryview):
                    base = base.obj
                assert base is r._map
                start = view.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
                assert start == r.data_offset + r.array_entries(name)[role]["offset"]
                assert start % 64 == 0
        assert r["output"] is r["output"]  # cached: one Tensor per name
        del whole


def test_reader_api(tmp_path):
    path, written = write_sample(tmp_path / "m.qbin")
    with QbinReader(path) as r:
        assert r.names() == list(written) + ["tokenizer"]
        assert "norm" in r and "nope" not in r and len(r) == len(written) + 1
        assert r.get("nope") is None
        with pytest.raises(KeyError, match="nope"):
            r["nope"]


def test_empty_array_round_trip(tmp_path):
    t = Tensor("empty", "f32", (0, 4), {"data": np.zeros((0, 4), np.float32)})
    with QbinReader(_write(tmp_path / "e.qbin", t), verify=True) as r:
        view = r["empty"].arrays["data"]
        assert view.shape == (0, 4) and not view.flags.writeable


def test_writer_refuses_duplicates_and_undeclared_tokenizer(tmp_path):
    t = parse_scheme("f32").quantize("norm", np.ones(4, np.float32))
    with pytest.raises(ValueError, match="added twice"):
        with QbinWriter(tmp_path / "a.qbin") as w:
            w.add_tensor(t)
            w.add_tensor(t)
    with pytest.raises(ValueError, match="tokenizer tensor"):
        _write(tmp_path / "b.qbin", t, tokenizer=metadata()["tokenizer"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []
