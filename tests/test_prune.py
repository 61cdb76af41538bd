"""Pruning (convert/prune.py): patterns, masks, SparseGPT's sweep, compressed storage, convert()."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qformat.schemes import parse_scheme
from qformat.convert.prune import (
    check_layer, magnitude_mask, parse_pattern, sparse_sweep, store_pruned, swept_tensor, wanda_mask,
)

PATTERNS = ["2:4", "4:8", "50%"]


def assert_pattern(w: np.ndarray, text: str) -> None:
    """Every n:m block keeps at most n nonzeros; a fraction leaves the same count in every row."""
    p = parse_pattern(text)
    nonzero = np.asarray(w) != 0
    rows, k = nonzero.shape
    if p.structured:
        assert (nonzero.reshape(rows, k // p.m, p.m).sum(2) <= p.n).all()
    else:
        assert (nonzero.sum(1) <= k - p.pruned_count(k)).all()


def assert_keep(keep: torch.Tensor | np.ndarray, text: str) -> None:
    """The keep mask holds the pattern exactly."""
    p = parse_pattern(text)
    keep = np.asarray(keep, bool)
    rows, k = keep.shape
    if p.structured:
        assert (keep.reshape(rows, k // p.m, p.m).sum(2) == p.n).all()
    else:
        assert (keep.sum(1) == k - p.pruned_count(k)).all()


def layer_with_outlier_channels(n: int = 1200, k: int = 192, rows: int = 48, seed: int = 0):
    """Inputs with correlated channels and a few of high variance (as LLM activations have),
    and a weight; returns x (n, k), w (rows, k)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(n, k, generator=g) @ mix + 0.2 * torch.randn(n, k, generator=g)
    scale = torch.ones(k)
    scale[torch.randperm(k, generator=g)[:6]] = 15.0
    return x * scale, torch.randn(rows, k, generator=g)


def rel_output_error(x, w, w_hat) -> float:
    return float(torch.linalg.norm(x @ (w - w_hat).T) ** 2 / torch.linalg.norm(x @ w.T) ** 2)


# ---------------------------------------------------------------------------- patterns

@pytest.mark.parametrize("text,n,m,fraction", [("2:4", 2, 4, 0.5), ("4:8", 4, 8, 0.5), ("50%", 0, 0, 0.5),
                                               (" 62.5% ", 0, 0, 0.625)])
def test_parse_pattern(text, n, m, fraction):
    p = parse_pattern(text)
    assert (p.n, p.m, p.fraction) == (n, m, fraction)


@pytest.mark.parametrize("bad", ["1:4", "2:3", "8:16", "0%", "100%", "half", "50", "2:4:8", ""])
def test_bad_patterns_are_one_clear_line(bad):
    with pytest.raises(ValueError, match="2:4") as e:
        parse_pattern(bad)
    assert "\n" not in str(e.value)


def test_layer_checks():
    with pytest.raises(ValueError, match="divisible by 8"):
        check_layer(parse_pattern("4:8"), "w", (16, 100), parse_scheme("f16"))
    check_layer(parse_pattern("50%"), "w", (16, 100), parse_scheme("int4-g64"))  # any width


# ---------------------------------------------------------------------------- masks and the sweep

@pytest.mark.parametrize("text", PATTERNS)
def test_every_method_satisfies_the_pattern_exactly(text):
    x, w = layer_with_outlier_channels(k=200)  # 200: a partial last lazy block and group
    h = x.T @ x
    p = parse_pattern(text)
    for keep in (magnitude_mask(w, p), wanda_mask(w, h, p)):
        assert_keep(keep, text)
    for scheme in ("f32", "int4-g64", "int3-g32", "int8"):
        res = sparse_sweep(w, h, p, parse_scheme(scheme))
        assert_keep(res.keep, text)
        assert (res.w_hat[~res.keep] == 0).all()


@pytest.mark.parametrize("text", PATTERNS)
def test_wanda_beats_magnitude_and_sparsegpt_beats_wanda(text):
    x, w = layer_with_outlier_channels()
    h = x.T @ x
    p = parse_pattern(text)
    mag = rel_output_error(x, w, w * magnitude_mask(w, p))
    wanda = rel_output_error(x, w, w * wanda_mask(w, h, p))
    sgpt = rel_output_error(x, w, sparse_sweep(w, h, p, parse_scheme("f32")).w_hat)
    assert wanda < 0.5 * mag  # measured 0.10-0.11
    assert sgpt < 0.8 * wanda  # measured 0.59-0.70


@pytest.mark.parametrize("text", PATTERNS)
@pytest.mark.parametrize("scheme_name", ["int4-g64", "int3-g64"])
def test_joint_pruning_and_quantization_beats_prune_then_rtn(text, scheme_name):
    x, w = layer_with_outlier_channels(seed=1)
    h = x.T @ x
    p, scheme = parse_pattern(text), parse_scheme(scheme_name)
    pruned = sparse_sweep(w, h, p, parse_scheme("f32"))
    then_rtn = store_pruned("w", pruned.w_hat.numpy(), pruned.keep.numpy(), p, scheme).dequantize()
    joint = sparse_sweep(w, h, p, scheme).w_hat
    assert rel_output_error(x, w, joint) < 0.97 * rel_output_error(x, w, torch.from_numpy(then_rtn))


def test_fixed_mask_sweep_keeps_the_mask():
    """GPTQ of a Wanda mask: the compensation never revives a pruned weight."""
    x, w = layer_with_outlier_channels()
    h = x.T @ x
    p = parse_pattern("2:4")
    keep = wanda_mask(w, h, p)
    res = sparse_sweep(w, h, p, parse_scheme("int4-g64"), mask=keep)
    assert torch.equal(res.keep, keep)
    assert (res.w_hat[~keep] == 0).all()
    rtn = store_pruned("w", w.numpy(), keep.numpy(), p, parse_scheme("int4-g64")).dequantize()
    assert rel_output_error(x, w, res.w_hat) < rel_output_error(x, w, torch.from_numpy(rtn))


# ---------------------------------------------------------------------------- storage

@pytest.mark.parametrize("text", PATTERNS)
@pytest.mark.parametrize("scheme_name", ["int4-g64", "int4-g32-sym", "nf4-g64", "int3-g64", "int8", "f16"])
def test_stored_tensor_dequantizes_to_the_swept_weight(text, scheme_name):
    x, w = layer_with_outlier_channels(n=300, k=136, rows=20, seed=2)  # 136: partial last group
    p, scheme = parse_pattern(text), parse_scheme(scheme_name)
    res = sparse_sweep(w, x.T @ x, p, scheme)
    t = swept_tensor("w", res, p, scheme, slice(4, 20))
    deq = t.dequantize()
    if scheme.quantized:
        np.testing.assert_array_equal(deq, res.w_hat[4:20].numpy())
    else:
        np.testing.assert_array_equal(deq, res.w_hat[4:20].numpy().astype(np.float16).astype(np.float32))
    assert t.sparsity == ((p.n, p.m) if p.structured and scheme.quantized else None)
    assert_pattern(deq, text)


@pytest.mark.parametrize("text", ["2:4", "4:8"])
def test_nm_storage_is_compressed(text):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(5))
    p, scheme = parse_pattern(text), parse_scheme("int4-g64")
    keep = magnitude_mask(w, p)
    sparse = store_pruned("w", w.numpy(), keep.numpy(), p, scheme)
    dense = scheme.quantize("w", (w * keep).numpy())
    assert sparse.sparsity == (p.n, p.m) and "sparse_index" in sparse.arrays
    # half the codes plus 2-bit (2:4) or 4-bit (4:8) positions, the same scales and zeros
    assert sparse.arrays["codes"].nbytes == dense.arrays["codes"].nbytes // 2
    index_bits = 2 if p.m == 4 else 4
    assert sparse.arrays["sparse_index"].nbytes == 32 * 128 * index_bits // 8
    np.testing.assert_array_equal(sparse.dequantize() != 0, (dense.dequantize() != 0) & keep.numpy())
    assert_pattern(sparse.dequantize(), text)


# ---------------------------------------------------------------------------- convert and the CLI

@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("Language models predict the next token. The weather is sunny today. " * 100)
    return str(path)


def convert_pruned(model, dst, scheme, calib_text, **kw):
    from qformat.convert import convert

    return convert(model, dst, scheme, calib=calib_text, calib_samples=4, calib_seqlen=32, progress=False, **kw)


@pytest.mark.parametrize("scheme,method,prune,prune_method", [
    ("int4-g32", "rtn", "2:4", "magnitude"),
    ("int4-g64", "rtn", "4:8", "wanda"),
    ("int4-g32", "gptq", "2:4", None),  # sparsegpt, jointly
    ("int4-g32", "gptq", "50%", "wanda"),  # a Wanda mask quantized by GPTQ
    ("f16", "rtn", "2:4", "sparsegpt"),
    ("int8", "rtn", "50%", "sparsegpt"),
])
def test_convert_prunes_every_projection_and_round_trips(tiny_checkpoint, tmp_path, calib_text, scheme, method,
                                                         prune, prune_method):
    from qformat import QbinReader

    model = tiny_checkpoint("qwen2")  # q/k/v biases
    dst = tmp_path / "p.qbin"
    report = convert_pruned(model, dst, scheme, calib_text, method=method, prune=prune, prune_method=prune_method)
    r = QbinReader(dst, verify=True)
    how = prune_method or "sparsegpt"
    assert f"+prune({prune}, {how}" in r.provenance.method
    assert (r.provenance.calibration_sha256 is None) == (how == "magnitude" and method == "rtn")
    p = parse_pattern(prune)
    linears = [t for t in report.tensors if t.role == "linear"]
    assert len(linears) == 2 * 7
    for tr in linears:
        t = r[tr.name]
        compressed = p.structured and parse_scheme(scheme).quantized
        assert t.sparsity == ((p.n, p.m) if compressed else None)
        assert "perm" not in t.arrays  # act-order is off under pruning
        assert_pattern(t.dequantize(), prune)
    # embeddings and norms are never pruned
    assert (r["tok_embeddings"].dequantize() != 0).mean() > 0.99
    assert (r["layers.0.attn_norm"].dequantize() != 0).all()


def test_pruned_int4_file_is_smaller(tiny_checkpoint, tmp_path, calib_text):
    model = tiny_checkpoint("llama")
    dense = convert_pruned(model, tmp_path / "d.qbin", "int4-g32", calib_text)
    sparse = convert_pruned(model, tmp_path / "s.qbin", "int4-g32", calib_text, prune="2:4", prune_method="magnitude")
    # 2:4 halves the 4-bit codes (2 bits per weight saved) and adds a 2-bit position per kept
    # value (1 bit per weight); scales and zeros are the same
    assert dense.linear_bpw - sparse.linear_bpw == pytest.approx(1.0, abs=0.01)
    assert sparse.file_size < dense.file_size


@pytest.mark.parametrize("args,message", [
    (["--prune", "3:4"], "Invalid value for '--prune'"),
    (["--prune", "50"], "expected 2:4, 4:8 or a percentage"),
    (["--prune", "2:4", "--method", "awq"], "does not combine with --method awq"),
    (["--prune-method", "wanda"], "without a pattern"),
    (["--prune", "2:4", "--prune-method", "obs"], "Invalid value for '--prune-method'"),
])
def test_cli_prune_errors_are_one_line(tiny_checkpoint, tmp_path, args, message):
    from click.testing import CliRunner

    from qformat.convert.cli import main

    res = CliRunner().invoke(main, [str(tiny_checkpoint("llama")), str(tmp_path / "o.qbin"), "-s", "int4-g32",
                                    "-q", *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_cli_prune_end_to_end_runs_in_the_runtime(tiny_checkpoint, tmp_path):
    """qconvert --prune 2:4, then the runtime's logits equal those of the same weights densified."""
    from click.testing import CliRunner

    import qformat
    from qformat import QbinReader
    from qformat.convert.cli import main
    from qformat.schemes import float_tensor
    from qformat.writer import QbinWriter

    model = tiny_checkpoint("llama")
    dst = tmp_path / "sparse.qbin"
    res = CliRunner().invoke(main, [str(model), str(dst), "-s", "int4-g32", "--prune", "2:4",
                                    "--prune-method", "magnitude", "-q"])
    assert res.exit_code == 0, res.output
    r = QbinReader(dst)
    dense = tmp_path / "dense.qbin"
    with QbinWriter(dense) as w:
        for name in r.names():
            t = r[name]
            if t.kind == "bytes":
                w.add_bytes(name, r.raw_bytes(name))
            elif t.sparsity is not None:
                w.add_tensor(float_tensor(name, t.dequantize(), "f32"))
            else:
                w.add_tensor(t)
        w.finish(model=r.model, tokenizer=r.tokenizer, chat_template=r.chat_template, generation=r.generation,
                 provenance=r.provenance)
    ids = [5, 17, 42, 8, 99, 3]
    try:
        sparse_logits = qformat.load(dst).logits(ids)
    except NotImplementedError as e:  # the n:m CPU kernel is written separately (issue 8)
        pytest.skip(f"no n:m runtime kernel yet: {e}")
    # the quantized kernels differ from float32 by rounding (measured: 0.005 on logits of size ~1.3
    # for the dense int4 kernel too); a misplaced kept value would be off by the order of the logits
    np.testing.assert_allclose(sparse_logits, qformat.load(dense).logits(ids), rtol=0, atol=0.02)
