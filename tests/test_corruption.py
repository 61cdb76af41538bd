"""Every malformed file is refused with one clear error: QbinError(path, problem) from the reader,
and from `qinfo` exactly one line `qinfo: error: <file>: <problem>` with exit code 2.

Each case starts from a valid sample file and breaks exactly one thing (write_raw and
rewrite_header keep every other field, checksum included, correct)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbin_testutil import array_entry, flip_byte, read_raw, rewrite_header, write_raw, write_sample
from qformat import QbinError, QbinReader
from qformat.constants import MAX_HEADER_BYTES, PREAMBLE, PREAMBLE_SIZE
from qformat.qinfo import main as qinfo, render, summarize


@dataclass
class Case:
    id: str
    build: Callable[[Path], Path]  # tmp_path -> the bad file
    match: str  # regex the problem must contain


def _base(tmp: Path) -> Path:
    path = tmp / "base.qbin"
    if not path.exists():
        write_sample(path)
    return path


def header(fn: Callable[[dict], object]) -> Callable[[Path], Path]:
    """A case that edits the header (sizes and checksum stay correct)."""
    return lambda tmp: rewrite_header(_base(tmp), fn, out=tmp / "bad.qbin")


def blob(fn: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    """A case that edits the file's bytes."""
    def build(tmp: Path) -> Path:
        out = tmp / "bad.qbin"
        out.write_bytes(fn(_base(tmp).read_bytes()))
        return out
    return build


def preamble(**fields) -> Callable[[Path], Path]:
    """A case that changes preamble fields (given as functions of the original values)."""
    def edit(data: bytes) -> bytes:
        values = dict(zip(("magic", "major", "minor", "header_len", "file_size", "xxh3"),
                          PREAMBLE.unpack(data[:PREAMBLE_SIZE])))
        values.update({k: f(values[k], len(data)) for k, f in fields.items()})
        return PREAMBLE.pack(*values.values()) + data[PREAMBLE_SIZE:]
    return blob(edit)


def flipped(offset: int) -> Callable[[Path], Path]:
    """A case that inverts one byte of the file."""
    def build(tmp: Path) -> Path:
        path = blob(lambda b: b)(tmp)
        flip_byte(path, offset)
        return path
    return build


def _directory(tmp: Path) -> Path:
    folder = tmp / "dir.qbin"
    folder.mkdir()
    return folder


def raw(hdr, data: bytes = b"", **kw) -> Callable[[Path], Path]:
    return lambda tmp: write_raw(tmp / "bad.qbin", hdr, data, **kw)


def arrays(h: dict, name: str) -> dict:
    return h["tensors"][name]["arrays"]


def set_in(path: list, value) -> Callable[[dict], None]:
    def edit(h):
        node = h
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def delete(path: list) -> Callable[[dict], None]:
    def edit(h):
        node = h
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def _last_array_past_end(h):
    last = max((a for e in h["tensors"].values() for a in e["arrays"].values()), key=lambda a: a["offset"])
    last["offset"] += 1 << 20


def _overlap(h):
    a = arrays(h, "tok_embeddings")
    a["scales"]["offset"] = a["codes"]["offset"] + 64


def _overlap_behind_empty_array() -> Callable[[Path], Path]:
    """Arrays [0, 256) and [128, 192) with an empty array at 64 sorted between them."""
    big, small, empty = np.ones(64, np.float32), np.ones(16, np.float32), np.zeros(0, np.float32)
    hdr = {"model": {}, "tensors": {
        "a": {"kind": "f32", "layout": 1, "shape": [64], "arrays": {"data": array_entry(big, "f32", 0)}},
        "e": {"kind": "f32", "layout": 1, "shape": [0], "arrays": {"data": array_entry(empty, "f32", 64)}},
        "b": {"kind": "f32", "layout": 1, "shape": [16], "arrays": {"data": array_entry(small, "f32", 128)}},
    }}
    return raw(hdr, big.tobytes())


def _same_nbytes_other_shape(h):
    a = arrays(h, "norm")["data"]
    a["shape"] = [2, 24]


def _huge_dimension(h):
    a = arrays(h, "norm")["data"]
    a["shape"], a["nbytes"] = [0, 1 << 70], 0


CASES = [
    Case("missing_file", lambda tmp: tmp / "nope.qbin", r"no such file"),
    Case("directory", _directory, r"is a directory"),
    Case("empty_file", blob(lambda b: b""), r"empty file"),
    Case("truncated_preamble", blob(lambda b: b[:20]), r"truncated: 20 bytes, shorter than the 32-byte preamble"),
    Case("truncated_in_header", blob(lambda b: b[:200]), r"size is 200 bytes but the file records \d+: truncated"),
    Case("truncated_in_data", blob(lambda b: b[: len(b) // 2 + 7]), r"truncated"),
    Case("truncated_last_byte", blob(lambda b: b[:-1]), r"truncated"),
    Case("trailing_garbage", blob(lambda b: b + b"garbage"), r"trailing bytes"),
    Case("bad_magic", blob(lambda b: b"GGUF" + b[4:]), r"not a qbin file \(starts with b'GGUF'"),
    Case("unknown_major", preamble(major=lambda v, n: 7), r"version 7\.0 is not supported"),
    Case("header_len_over_limit", preamble(header_len=lambda v, n: MAX_HEADER_BYTES + 1),
         rf"header length {MAX_HEADER_BYTES + 1} exceeds"),
    Case("header_past_end", preamble(header_len=lambda v, n: n), r"header of \d+ bytes runs past the end"),
    Case("file_size_mismatch", preamble(file_size=lambda v, n: v + 64), r"file records \d+"),
    Case("header_byte_flipped", flipped(PREAMBLE_SIZE + 40), r"header checksum mismatch"),
    Case("header_checksum_flipped", flipped(30), r"header checksum mismatch"),
    Case("non_utf8_header", raw(b'{"model": {}, "tensors": {}, "x": "\xff\xfe"}'), r"malformed header JSON"),
    Case("malformed_json", raw('{"model": {}, "tensors": '), r"malformed header JSON"),
    Case("json_not_object", raw("[1, 2, 3]"), r"not a JSON object"),
    Case("json_huge_integer", raw('{"model": {}, "tensors": {}, "n": 1' + "0" * 5000 + "}"), r"malformed header JSON"),
    Case("json_deep_nesting", raw("[" * 100_000 + "]" * 100_000), r"malformed header JSON"),
    Case("missing_model", header(delete(["model"])), r"no 'model' section"),
    Case("model_not_object", header(set_in(["model"], [1])), r"'model' is not an object"),
    Case("model_missing_field", header(delete(["model", "dim"])), r"'model' is invalid"),
    Case("rope_scaling_not_object", header(set_in(["model", "rope_scaling"], 5)), r"'model' is invalid"),
    Case("provenance_files_not_object", header(set_in(["provenance", "source_files"], 1)),
         r"'provenance' is invalid: source_files must map"),
    Case("provenance_field_not_string", header(set_in(["provenance", "method"], [1])),
         r"'provenance' is invalid: method must be a string"),
    Case("missing_tensors", header(delete(["tensors"])), r"no 'tensors' directory"),
    Case("tensors_not_object", header(set_in(["tensors"], [])), r"no 'tensors' directory"),
    Case("entry_not_object", header(set_in(["tensors", "norm"], 5)), r"'norm': entry has no 'arrays'"),
    Case("offset_past_end", header(_last_array_past_end), r"run past the end of the data"),
    Case("misaligned_offset", header(lambda h: arrays(h, "norm")["data"].update(offset=arrays(h, "norm")["data"]["offset"] + 8)),
         r"'norm'\.data: offset \d+ is not 64-byte aligned"),
    Case("negative_offset", header(set_in(["tensors", "norm", "arrays", "data", "offset"], -64)), r"offset -64"),
    Case("nbytes_mismatch", header(lambda h: arrays(h, "norm")["data"].update(nbytes=196)),
         r"nbytes 196 but dtype f32 and shape \[48\] need 192"),
    Case("overlapping_arrays", header(_overlap), r"arrays tok_embeddings\.codes and tok_embeddings\.scales overlap"),
    Case("overlap_behind_empty_array", _overlap_behind_empty_array(), r"arrays a\.data and b\.data overlap"),
    Case("missing_required_array", header(lambda h: arrays(h, "output").pop("scales")), r"missing array\(s\) scales"),
    Case("missing_sparse_index", header(lambda h: arrays(h, "layers.0.ffn.w2").pop("sparse_index")),
         r"missing array\(s\) sparse_index"),
    Case("unknown_role", header(lambda h: arrays(h, "norm").update(bogus=arrays(h, "norm")["data"])),
         r"array role 'bogus' is not defined for kind f32"),
    Case("unknown_kind", header(set_in(["tensors", "norm", "kind"], "q7")), r"unknown kind 'q7'"),
    Case("kind_not_a_string", header(set_in(["tensors", "norm", "kind"], ["f32"])), r"unknown kind \['f32'\]"),
    Case("unknown_layout_version", header(set_in(["tensors", "output", "layout"], 2)), r"q8 layout version 2"),
    Case("unknown_dtype", header(set_in(["tensors", "norm", "arrays", "data", "dtype"], "f8")), r"unknown dtype 'f8'"),
    Case("wrong_dtype_for_role", header(lambda h: arrays(h, "output")["scales"].update(dtype="u16")),
         r"output'\.scales: dtype u16 \(expected f16 or u8\)"),
    Case("negative_shape", header(set_in(["tensors", "norm", "arrays", "data", "shape"], [-48])),
         r"shape \[-48\] is not a list of non-negative integers"),
    Case("bool_shape", header(set_in(["tensors", "norm", "arrays", "data", "shape"], [True])), r"shape \[True\]"),
    Case("bool_tensor_shape", header(set_in(["tensors", "norm", "shape"], [True])), r"shape \[True\]"),
    Case("shape_not_list", header(set_in(["tensors", "norm", "shape"], "48")), r"shape '48'"),
    Case("array_shape_for_kind", header(_same_nbytes_other_shape), r"shape \[2, 24\] \(expected \[48\]\)"),
    Case("huge_dimension", header(_huge_dimension), r"shape"),
    Case("group_size_zero", header(set_in(["tensors", "output", "group_size"], 0)), r"group_size 0"),
    Case("symmetric_not_bool", header(set_in(["tensors", "output", "symmetric"], "yes")), r"symmetric must be"),
    Case("bad_sparsity", header(set_in(["tensors", "layers.0.ffn.w2", "sparsity"], 5)), r"sparsity 5"),
    Case("unsupported_sparsity", header(set_in(["tensors", "layers.0.ffn.w2", "sparsity"], [1, 4])), r"sparsity 1:4"),
    Case("activation_not_object", header(set_in(["tensors", "output", "activation"], 8)), r"activation 8"),
    Case("bad_checksum_text", header(set_in(["tensors", "norm", "arrays", "data", "xxh3"], "XYZ")), r"xxh3 'XYZ'"),
    Case("tokenizer_tensor_missing", header(set_in(["tokenizer", "tensor"], "nope")), r"tokenizer tensor 'nope'"),
    Case("tokenizer_tensor_not_string", header(set_in(["tokenizer", "tensor"], [1])), r"tokenizer tensor \[1\]"),
    Case("selftest_malformed", header(set_in(["tokenizer", "selftest"], ["x"])), r"'tokenizer' is invalid"),
    Case("chat_template_not_string", header(set_in(["chat_template"], 5)), r"'chat_template' is not a string"),
]


def _data_offset(path: Path, name: str, role: str) -> int:
    with QbinReader(path) as r:
        return r.data_offset + r.array_entries(name)[role]["offset"]


def _flip_tensor_byte(tmp: Path) -> Path:
    path = blob(lambda b: b)(tmp)
    flip_byte(path, _data_offset(path, "layers.0.ffn.w1", "codes") + 5)
    return path


def _flip_padding_byte(tmp: Path) -> Path:
    path = blob(lambda b: b)(tmp)
    with QbinReader(path) as r:  # the byte after an array whose length is not a multiple of 64
        ends = [a["offset"] + a["nbytes"] for n in r.names() for a in r.array_entries(n).values()]
        gap = r.data_offset + next(e for e in ends if e % 64)
    flip_byte(path, gap)
    return path


VERIFY_CASES = [  # the file opens (checksums are not read at open), verify() refuses it
    Case("tensor_byte_flipped", _flip_tensor_byte, r"checksum mismatch in tensor 'layers\.0\.ffn\.w1' array 'codes'"),
    Case("stored_checksum_changed", header(set_in(["tensors", "norm", "arrays", "data", "xxh3"], "0" * 16)),
         r"checksum mismatch in tensor 'norm' array 'data' \(stored 0000000000000000"),
    Case("padding_byte_flipped", _flip_padding_byte, r"non-zero padding byte at file offset \d+"),
]


def _ids(cases):
    return [c.id for c in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_reader_refuses(case, tmp_path):
    path = case.build(tmp_path)
    with pytest.raises(QbinError) as info:
        QbinReader(path)
    err = info.value
    assert err.path == str(path) and str(err).startswith(f"{path}: ")
    assert re.search(case.match, err.problem), err.problem
    assert "\n" not in str(err)


def _qinfo(path: Path, *args: str):
    result = CliRunner().invoke(qinfo, [*args, str(path)])
    assert "Traceback" not in result.output
    return result


def _assert_one_error_line(result, path: Path, match: str):
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"qinfo: error: {path}: "), lines[0]
    assert re.search(match, lines[0]), lines[0]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_qinfo_refuses(case, tmp_path):
    path = case.build(tmp_path)
    for args in ((), ("--json",), ("--verify",)):
        _assert_one_error_line(_qinfo(path, *args), path, case.match)


@pytest.mark.parametrize("case", VERIFY_CASES, ids=_ids(VERIFY_CASES))
def test_verify_catches_data_corruption(case, tmp_path):
    path = case.build(tmp_path)
    with QbinReader(path) as r:  # plain open succeeds: data is not read
        assert r.names()
        with pytest.raises(QbinError, match=case.match):
            r.verify()
    with pytest.raises(QbinError, match=case.match):
        QbinReader(path, verify=True)
    assert _qinfo(path).exit_code == 0
    _assert_one_error_line(_qinfo(path, "--verify"), path, case.match)


def test_console_script_prints_one_line(tmp_path):
    """The installed entry point, in a fresh process: no traceback, exit code 2."""
    bad = tmp_path / "bad.qbin"
    bad.write_bytes(b"QBIN" + b"\0" * 10)
    proc = subprocess.run([sys.executable, "-c", "from qformat.qinfo import main; main()", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"qinfo: error: {bad}: truncated: 14 bytes, shorter than the "
                                        "32-byte preamble"]


def test_valid_sample_passes_everything(tmp_path):
    """The base of every case above is itself valid, so each case fails for its own reason."""
    path = _base(tmp_path)
    assert QbinReader(path, verify=True).verify() > 0
    assert _qinfo(path, "--verify").exit_code == 0


# ---------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    """Every (container path, key) in a JSON tree, for mutation."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_never_escape_as_other_errors(tmp_path, data):
    """Any edit of any header value: the reader opens the file or raises QbinError, and
    whatever it opens qinfo can summarize and every view can be taken."""
    base = _base(tmp_path)
    _, hdr, _ = read_raw(base)
    paths = sorted(_paths(hdr), key=repr)
    target = data.draw(st.sampled_from(paths))
    remove = data.draw(st.booleans())

    def mutate(h):
        node = h
        for key in target[:-1]:
            node = node[key]
        if remove:
            del node[target[-1]]
        else:
            node[target[-1]] = data.draw(json_values)

    path = rewrite_header(base, mutate, out=tmp_path / "fuzz.qbin")
    try:
        r = QbinReader(path)
    except QbinError:
        return
    with r:
        render(summarize(r))
        for name in r.names():
            r[name]
    json.dumps(summarize(QbinReader(path)))
