"""Log-coded 8-bit scales (spec §4.3, the "-dq" schemes): the grid, the quantizers, the file, the runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qformat
from qformat import QbinReader
from qformat.constants import KIND_LAYOUTS, LOG_SCALE_MIN
from qformat.convert import convert, rtn
from qformat.convert.gptq import gptq_quantize
from qformat.convert.groupquant import fake_quant, quantize_to_tensor
from qformat.layout import check_tensor
from qformat.qinfo import scheme_label, scheme_of
from qformat.schemes import (decode_log_scales, encode_log_scales, expand_log_scales, log_scale, parse_scheme)
from qformat.writer import QbinWriter

SCHEMES = ["int4-g64-dq", "int3-g32-sym-dq", "int2-g64-dq", "nf4-g64-dq", "int6-g64-dq", "int8-g32-dq"]


def test_decoding_is_the_spec_formula():
    codes = np.arange(256)
    for e in (-6, -2, 0, 3):
        # ldexp in float32 then one rounding: equal to rounding 2^(e - c/16) from float64 once
        want = np.array([np.float16(2.0 ** (e - c / 16)) for c in codes])
        got = decode_log_scales(codes.astype(np.uint8), np.array([e], np.int32))
        np.testing.assert_array_equal(got[got >= LOG_SCALE_MIN], want[got >= LOG_SCALE_MIN])


def test_grid_scales_encode_exactly_and_the_exponent_covers_the_largest():
    rng = np.random.default_rng(0)
    s = log_scale(np.exp(rng.uniform(np.log(1e-4), np.log(0.5), size=(50, 7))))
    codes, e = encode_log_scales(s)
    assert codes.dtype == np.uint8 and e.dtype == np.int32 and e.shape == (1,)
    assert 2.0 ** (int(e[0]) - 1) < s.max() <= 2.0 ** int(e[0])
    np.testing.assert_array_equal(decode_log_scales(codes, e), s)
    # rounding to the grid: within half a step (2^(1/32)) in the log domain, never below the floor
    x = np.exp(rng.uniform(np.log(1e-6), np.log(4.0), size=1000))
    r = log_scale(x).astype(np.float64)
    assert np.all(r >= LOG_SCALE_MIN)
    above = x >= LOG_SCALE_MIN
    assert np.all(np.abs(np.log2(r[above] / x[above])) <= 1 / 32 + 1e-3)


def test_scheme_names():
    s = parse_scheme("int4-g64-sym-dq")
    assert (s.kind, s.group_size, s.symmetric, s.log_scales, s.name) == ("q4", 64, True, True, "int4-g64-sym-dq")
    assert not parse_scheme("int4-g64").log_scales
    with pytest.raises(ValueError):
        parse_scheme("int4-dq-g64")


@pytest.mark.parametrize("name", SCHEMES)
def test_quantizers_store_what_they_computed(name):
    """RTN (NumPy and torch), GPTQ with and without a permutation: the stored tensor dequantizes
    to exactly the weights the method computed, with u8 scales; up to 4 bits, close to float16
    scales' error (wider codes feel the grid's 4.4% steps more: int6-g64 +6.9% on SmolLM2)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((48, 200)) * 0.05).astype(np.float32)
    scheme = parse_scheme(name)
    t = scheme.quantize("w", w)
    assert t.arrays["scales"].dtype == np.uint8 and "scale_exp" in t.arrays
    np.testing.assert_array_equal(quantize_to_tensor("w", torch.from_numpy(w), scheme).dequantize(), t.dequantize())
    np.testing.assert_array_equal(fake_quant(torch.from_numpy(w), scheme).numpy(), t.dequantize())
    plain = parse_scheme(name[:-3]).quantize("w", w)
    err, err_plain = (float(np.square(x.dequantize() - w).sum()) for x in (t, plain))
    assert err < (1.03 if scheme.bits <= 4 else 1.5) * err_plain
    x = torch.randn(400, 200)
    for static in (False, True):
        res = gptq_quantize(torch.from_numpy(w), x.T @ x, scheme, act_order=True, static_groups=static)
        g = res.tensor("w", scheme)
        assert g.arrays["scales"].dtype == np.uint8 and ("perm" in g.arrays) == (not static)
        np.testing.assert_array_equal(g.dequantize(), res.w_hat.numpy())


def test_row_blocks_share_one_exponent(monkeypatch):
    """quantize_weight joins row blocks: one exponent for the tensor, the same values as one call."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 128)) * np.linspace(0.01, 2.0, 64)[:, None]).astype(np.float32)
    scheme = parse_scheme("int4-g64-dq")
    whole, _ = rtn.quantize_weight("w", w, scheme, clip_search=False)
    monkeypatch.setattr(rtn, "BLOCK_ELEMENTS", 128 * 8)  # 8 blocks of 8 rows
    blocks, _ = rtn.quantize_weight("w", w, scheme, clip_search=False)
    assert blocks.arrays["scale_exp"].shape == (1,)
    np.testing.assert_array_equal(blocks.dequantize(), whole.dequantize())
    np.testing.assert_array_equal(blocks.dequantize(), scheme.quantize("w", w).dequantize())


def test_layout_rules():
    t = parse_scheme("int4-g64-dq").quantize("w", np.ones((4, 64), np.float32))
    names = {"uint8": "u8", "int32": "i32", "float16": "f16"}
    arrays = {r: (names[a.dtype.name], a.shape) for r, a in t.arrays.items()}
    meta = dict(t.meta(), layout=KIND_LAYOUTS[t.kind])
    check_tensor("w", meta, arrays)
    without = {r: v for r, v in arrays.items() if r != "scale_exp"}
    with pytest.raises(ValueError, match="scale_exp"):
        check_tensor("w", meta, without)
    with pytest.raises(ValueError, match="scale_exp"):
        check_tensor("w", meta, dict(arrays, scales=("f16", arrays["scales"][1])))


def test_converted_file_runs_as_its_float16_twin(tiny_checkpoint, tmp_path):
    """A "-dq" conversion: every tensor sized exactly by the dry run, u8 scales in the file, decoded by the
    reader, and the runtime's logits equal those of the same file rewritten with float16 scales."""
    folder = tiny_checkpoint("llama", True, "float32", False, "hf-json")
    out = tmp_path / "dq.qbin"
    dry = convert(folder, out, "int4-g64-dq", dry_run=True)
    report = convert(folder, out, "int4-g64-dq", progress=False)
    assert report.file_size == out.stat().st_size
    assert [(t.name, t.nbytes) for t in dry.tensors] == [(t.name, t.nbytes) for t in report.tensors]
    plain = convert(folder, tmp_path / "plain.qbin", "int4-g64", progress=False)
    assert report.file_size < plain.file_size
    r = QbinReader(out, verify=True)
    name = "layers.0.attn.wq"
    entry = r.header["tensors"][name]
    assert entry["arrays"]["scales"]["dtype"] == "u8" and "scale_exp" in entry["arrays"]
    assert r[name].arrays["scales"].dtype == np.float16 and "scale_exp" not in r[name].arrays
    assert scheme_label(scheme_of(entry)) == "q4 g64 asym dq"
    twin = tmp_path / "twin.qbin"
    with QbinWriter(twin) as writer:
        for n in r.names():
            writer.add_tensor(expand_log_scales(r[n]))
        writer.finish(model=r.model, tokenizer=r.tokenizer, chat_template=r.chat_template, generation=r.generation)
    assert all(QbinReader(twin).header["tensors"][n]["arrays"]["scales"]["dtype"] == "f16"
               for n in r.names() if "scales" in r.header["tensors"][n]["arrays"])
    ids = [1, 5, 9, 3, 7, 2, 8]
    np.testing.assert_array_equal(qformat.load(out, threads=1).logits(ids), qformat.load(twin, threads=1).logits(ids))
