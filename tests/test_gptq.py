"""GPTQ, the layer-by-layer runner and the calibration data, on synthetic layers and tiny models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qformat.schemes import parse_scheme
from qformat.convert.calibration import Calibration, CalibrationError, calibration_tokens, sample_windows
from qformat.convert.gptq import gptq_quantize, output_error
from qformat.convert.groupquant import fake_quant, quantize_to_tensor

SCHEMES = ["int4-g64", "int3-g64", "int2-g64", "int4-g64-sym", "int2-g32-sym", "nf4-g64", "int8", "int3-g128"]


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels of unequal scale: where GPTQ's compensation matters."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = 0.5 + 3 * torch.rand(k, generator=g)
    return (torch.randn(n, k, generator=g) @ mix + 0.3 * torch.randn(n, k, generator=g)) * scale


ACT_ORDERS = [False, True, "static"]  # "static": act-order with static groups (no perm stored)


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("act_order", ACT_ORDERS)
def test_gptq_beats_rtn_on_output_error(scheme_name, act_order):
    scheme = parse_scheme(scheme_name)
    k = 200  # not a multiple of 64 or 128: a partial last group
    x = correlated_inputs(1500, k)
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(1))
    res = gptq_quantize(w, x.T @ x, scheme, act_order=bool(act_order), static_groups=act_order == "static")
    rtn = torch.from_numpy(scheme.quantize("w", w.numpy()).dequantize())
    err_gptq = torch.linalg.norm(x @ w.T - x @ res.w_hat.T)
    err_rtn = torch.linalg.norm(x @ w.T - x @ rtn.T)
    assert err_gptq < 0.9 * err_rtn


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("act_order", ACT_ORDERS)
def test_stored_tensor_dequantizes_to_gptq_weights_exactly(scheme_name, act_order):
    scheme = parse_scheme(scheme_name)
    x = correlated_inputs(400, 136, seed=2)
    w = torch.randn(24, 136, generator=torch.Generator().manual_seed(3))
    res = gptq_quantize(w, x.T @ x, scheme, act_order=bool(act_order), clip_search=True,
                        static_groups=act_order == "static")
    t = res.tensor("w", scheme)
    assert ("perm" in t.arrays) == (act_order is True)
    if act_order is True:
        assert sorted(t.arrays["perm"].tolist()) == list(range(136))
    np.testing.assert_array_equal(t.dequantize(), res.w_hat.numpy())


@pytest.mark.parametrize("scheme_name", ["int4-g64", "int4-g32-sym", "int3-g64"])
def test_static_groups_take_the_unquantized_weights_grid(scheme_name):
    """With static groups every group's scale and zero-point are round-to-nearest's, fixed
    before the sweep, whatever order the columns are visited in."""
    scheme = parse_scheme(scheme_name)
    x = correlated_inputs(400, 136, seed=5)
    w = torch.randn(24, 136, generator=torch.Generator().manual_seed(6))
    t = gptq_quantize(w, x.T @ x, scheme, act_order=True, static_groups=True).tensor("w", scheme)
    rtn = scheme.quantize("w", w.numpy())
    np.testing.assert_array_equal(t.arrays["scales"], rtn.arrays["scales"])
    if "zeros" in rtn.arrays:
        np.testing.assert_array_equal(t.arrays["zeros"], rtn.arrays["zeros"])
    assert "perm" not in t.arrays and not np.array_equal(t.arrays["codes"], rtn.arrays["codes"])


@pytest.mark.parametrize("scheme_name", ["int4-g64", "int3-g64", "int2-g64-sym", "nf4-g64", "int8"])
def test_torch_quantizer_matches_numpy_reference(scheme_name):
    scheme = parse_scheme(scheme_name)
    w = torch.randn(16, 150, generator=torch.Generator().manual_seed(4)) * 0.05
    w[0, :10] = 0.0  # a constant run and a zero-range group
    w[1, :] = 0.0
    ref = scheme.quantize("w", w.numpy(), clip=0.85)
    ours = quantize_to_tensor("w", w, scheme, 0.85)
    for role, arr in ref.arrays.items():
        np.testing.assert_array_equal(ours.arrays[role], arr)
    np.testing.assert_array_equal(fake_quant(w, scheme, 0.85).numpy(), ref.dequantize())


def test_dead_inputs_get_zero_weights_and_no_nan():
    x = correlated_inputs(300, 64, seed=5)
    x[:, [3, 17]] = 0.0  # channels never active in calibration
    w = torch.randn(8, 64)
    res = gptq_quantize(w, x.T @ x, parse_scheme("int4-g32"))
    assert torch.isfinite(res.w_hat).all()
    assert (res.w_hat[:, [3, 17]] == 0).all()
    err, ref = output_error(w, res.w_hat, x.T @ x)
    assert err < 0.05 * ref


def test_sample_windows_are_seeded_and_disjoint():
    ids = np.arange(10_000)
    a = sample_windows(ids, 8, 512, seed=0)
    assert a.shape == (8, 512)
    np.testing.assert_array_equal(a, sample_windows(ids, 8, 512, seed=0))
    starts = sorted(a[:, 0])
    assert all(b - s >= 512 for s, b in zip(starts, starts[1:]))
    assert not np.array_equal(a, sample_windows(ids, 8, 512, seed=1))
    with pytest.raises(CalibrationError, match="fewer than one window"):
        sample_windows(np.arange(100), 2, 512)
    assert Calibration(a, "x").sha256 != Calibration(a[::-1], "x").sha256


def test_calibration_from_text_file(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    cal = calibration_tokens(model, str(text), samples=4, seqlen=32)
    assert cal.tokens.shape == (4, 32)
    with pytest.raises(CalibrationError, match="no such file"):
        calibration_tokens(model, str(tmp_path / "missing.txt"), samples=4, seqlen=32)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_torch_layer_matches_transformers(tiny_checkpoint, arch):
    from transformers import AutoModelForCausalLM

    from qformat.convert.architectures import lookup, tensor_rules
    from qformat.convert.checkpoint import Checkpoint
    from qformat.convert.hf_config import model_args
    from qformat.convert.layerwise import layer_forward, rms_norm, rope_tables

    folder = tiny_checkpoint(arch)
    config = json.loads((folder / "config.json").read_text())
    args = model_args(config, {}, has_lm_head=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    ckpt = Checkpoint(folder)
    rules = tensor_rules(lookup(config["architectures"][0]), args.n_layers)
    rope = rope_tables(args, 40, "cpu")
    x = hidden[0]
    with torch.no_grad():
        for i in range(args.n_layers):
            w = {q.split(".", 2)[2]: torch.from_numpy(ckpt.read(hf))
                 for hf, q, _ in rules if q.startswith(f"layers.{i}.") and hf in ckpt}
            x = layer_forward(x, w, args, rope, i)
        x = rms_norm(x, torch.from_numpy(ckpt.read("model.norm.weight")), args.norm_eps)
    torch.testing.assert_close(x, hidden[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_convert_with_calibrated_method(tiny_checkpoint, tmp_path, method):
    from qformat import QbinReader
    from qformat.convert import convert

    model = tiny_checkpoint("qwen2")  # q/k/v biases
    text = tmp_path / "calib.txt"
    text.write_text("Language models predict the next token. The weather is sunny today. " * 100)
    dst = tmp_path / f"{method}.qbin"
    report = convert(model, dst, "int4-g32", method=method, calib=str(text), calib_samples=4, calib_seqlen=32,
                     progress=False)
    r = QbinReader(dst, verify=True)
    assert r.provenance.method.startswith(method)
    assert r.provenance.calibration_sha256 and len(r.provenance.calibration_sha256) == 64
    assert any("mean relative output error" in n for n in report.notes)
    rtn = QbinReader(convert(model, tmp_path / "rtn.qbin", "int4-g32", progress=False).dst)
    folded = not np.array_equal(r["layers.0.attn_norm"].dequantize(), rtn["layers.0.attn_norm"].dequantize())
    assert folded == (method == "awq")  # AWQ folds its scales into the norms; GPTQ leaves them
    assert r["layers.1.ffn.w2"].kind == "q4"


def test_cli_calibration_errors_are_one_line(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from qformat.convert.cli import main

    res = CliRunner().invoke(main, [str(tiny_checkpoint("llama")), str(tmp_path / "o.qbin"), "-s", "int4-g32",
                                    "--method", "gptq", "--calib", str(tmp_path / "nope.txt"), "-q"])
    assert res.exit_code == 2
    assert "no such file" in res.output and "Traceback" not in res.output


def test_self_sampled_calibration_is_cached_and_reproducible(tiny_checkpoint, monkeypatch):
    from qformat.convert import calibration

    model = tiny_checkpoint("llama")
    first = calibration_tokens(model, "self", samples=3, seqlen=12, fingerprint="fp")
    assert first.tokens.shape == (3, 12) and first.source == "self"
    assert list(calibration.cache_dir().glob("self-*.npy"))
    # A second draw of the same model, size and seed is read back, not sampled again.
    monkeypatch.setattr(calibration, "self_sampled", lambda *a, **k: pytest.fail("sampled again"))
    np.testing.assert_array_equal(calibration_tokens(model, "self", samples=3, seqlen=12, fingerprint="fp").tokens,
                                  first.tokens)
    mix = calibration_tokens(model, "mix", samples=6, seqlen=12, fingerprint="fp")
    assert mix.tokens.shape == (6, 12) and mix.source == "mix"
    np.testing.assert_array_equal(mix.tokens[3:], first.tokens)  # the self half is the cached draw
