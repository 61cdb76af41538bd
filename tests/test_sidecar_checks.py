"""Sidecar contents the spec constrains beyond shapes: the writer refuses to emit them and the
reader refuses to hand them out (through a file patched after writing)."""
from __future__ import annotations

import numpy as np
import pytest

from qformat import QbinError, QbinReader, QbinWriter, parse_scheme
from qbin_testutil import add_fp_cols, add_outliers, add_perm, metadata, sparse_2of4, TOKENIZER_BYTES


def _tensor(kind: str):
    rng = np.random.default_rng(0)
    if kind == "sparse":
        return sparse_2of4("layers.0.ffn.w2", 8, 32, 16, "q4", False, rng)
    t = parse_scheme("int4-g16").quantize("layers.0.attn.wq", rng.standard_normal((8, 40)).astype(np.float32))
    return {"perm": add_perm, "outliers": add_outliers, "outliers-negative": add_outliers, "fp": add_fp_cols}[kind](t, rng)


def _break(t, kind: str) -> None:
    a = t.arrays
    if kind == "perm":
        a["perm"] = a["perm"].copy()
        a["perm"][0] = a["perm"][1]  # a repeated channel
    elif kind == "outliers":
        a["outlier_cols"] = np.full_like(a["outlier_cols"], t.shape[1])  # past in_features
    elif kind == "outliers-negative":  # a fuzzer's find: only the upper bound was checked
        a["outlier_cols"] = a["outlier_cols"].copy()
        a["outlier_cols"][0] = -16777179
    elif kind == "fp":
        a["fp_cols"] = a["fp_cols"].copy()
        a["fp_cols"][0] = -1
    else:
        a["sparse_index"] = np.zeros_like(a["sparse_index"])  # positions 0, 0: not increasing


def _write(path, t) -> None:
    with QbinWriter(path, overwrite=True) as w:
        w.add_tensor(t)
        w.add_bytes("tokenizer", TOKENIZER_BYTES)
        w.finish(**metadata())


@pytest.mark.parametrize("kind", ["perm", "outliers", "outliers-negative", "fp", "sparse"])
def test_writer_refuses_bad_sidecar(tmp_path, kind):
    t = _tensor(kind)
    _break(t, kind)
    with pytest.raises(ValueError, match=t.name):
        _write(tmp_path / "x.qbin", t)
    assert not (tmp_path / "x.qbin").exists()


@pytest.mark.parametrize("kind", ["perm", "outliers", "outliers-negative", "fp", "sparse"])
def test_reader_refuses_bad_sidecar(tmp_path, kind):
    good = _tensor(kind)
    path = tmp_path / "x.qbin"
    _write(path, good)
    with QbinReader(path) as r:
        np.testing.assert_array_equal(r[good.name].dequantize(), good.dequantize())
        entry = r.array_entries(good.name)
        offsets = {role: r.data_offset + e["offset"] for role, e in entry.items()}
    bad = _tensor(kind)
    _break(bad, kind)
    role = {"perm": "perm", "outliers": "outlier_cols", "outliers-negative": "outlier_cols", "fp": "fp_cols",
            "sparse": "sparse_index"}[kind]
    raw = bytearray(path.read_bytes())
    data = np.ascontiguousarray(bad.arrays[role]).tobytes()
    raw[offsets[role]:offsets[role] + len(data)] = data  # same size, checksum not re-computed
    path.write_bytes(bytes(raw))
    with QbinReader(path) as r, pytest.raises(QbinError, match=good.name):
        r[good.name]
