"""W8A8 (SmoothQuant, spec §6.5): int8 kernels against the NumPy reference, SmoothQuant's
folding and error on a layer with planted activation outliers, the converter and its CLI errors.

Kernel tolerance: the kernels sum the integer products exactly and scale in float32, the
reference sums in float64; 1e-5 of the largest output is far below a layout or indexing mistake.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qformat.kernels import linear_op, reference
from qformat.kernels.cpu import int8
from qformat.schemes import Tensor, parse_scheme

RTOL = 1e-5


def close(a, b, rtol=RTOL):
    return float(np.abs(a - b).max()) <= rtol * max(float(np.abs(b).max()), 1e-30)


def w8a8_tensor(rows, k, rng, *, scheme="w8a8", static=None, fp_cols=0, input_scale=False, perm=False):
    """A W8A8 tensor with the optional sidecars; the dense part is zero at the 16-bit columns."""
    w = rng.standard_normal((rows, k)).astype(np.float32)
    cols = np.sort(rng.choice(k, fp_cols, replace=False)) if fp_cols else None
    if cols is not None:
        w[:, cols] = 0.0
    t = parse_scheme(scheme).quantize("w", w)
    t.activation = {"bits": 8, "mode": "static" if static is not None else "dynamic"}
    if static is not None:
        t.arrays["act_scale"] = np.array([static], np.float32)
    if cols is not None:
        t.arrays["fp_cols"] = cols.astype(np.int32)
        t.arrays["fp_weight"] = rng.standard_normal((rows, fp_cols)).astype(np.float16)
    if input_scale:
        t.arrays["input_scale"] = rng.uniform(0.25, 4.0, k).astype(np.float32)
    if perm:
        t.arrays["perm"] = rng.permutation(k).astype(np.int32)
    return t


CASES = [
    dict(),
    dict(static=0.02),  # small enough that some codes saturate
    dict(fp_cols=5),
    dict(input_scale=True),
    dict(fp_cols=3, input_scale=True, static=0.05),
    dict(perm=True),
    dict(scheme="int8-asym"),
    dict(scheme="int8-g64"),  # grouped: the float fallback through the q8 kernels
    dict(scheme="int4-g64", fp_cols=2),  # not q8: float fallback
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("rows,k", [(37, 576), (20, 100), (3, 13)])
def test_w8a8_op_matches_reference(case, rows, k):
    rng = np.random.default_rng(rows + k)
    t = w8a8_tensor(rows, k, rng, **case)
    op = linear_op("cpu", t)
    x = rng.standard_normal((17, k)).astype(np.float32)
    x[:, 0] *= 30  # an outlier channel sets the token scales
    x[3] = 0.0  # an all-zero token: scale 0, codes 0
    ref = reference.linear_w8a8(t, x)
    # q4's GEMV rounds its (already int8) inputs again per weight group: compare loosely there
    tol = 3e-2 if case.get("scheme") == "int4-g64" else RTOL
    for i in (0, 3, 7):
        out = np.full(rows, np.nan, np.float32)
        op.gemv(x[i], out)
        assert close(out, ref[i], tol)
    assert close(op.gemm(x), ref, max(tol, 1e-4 if "scheme" in case else RTOL))
    for n in (1, 2):  # odd and even token counts of the 2x2 tiled GEMM
        assert close(op.gemm(x[:n]), ref[:n], tol)


KERNELS = [(int8.gemv_w8a8, int8.gemm_w8a8)] + ([(int8.gemv_w8a8_vnni, int8.gemm_w8a8_vnni)] if int8.VNNI else [])


@pytest.mark.parametrize("kernels", KERNELS, ids=lambda ks: ks[0].__name__)
@pytest.mark.parametrize("rows,k,n", [(9, 200, 4), (8, 576, 5), (3, 13, 1), (5, 128, 2)])
def test_w8a8_integer_kernels_are_exact(kernels, rows, k, n):
    """Both kernel families (portable loops and vpdpbusd, where the CPU has it) give the exact
    integer dot products of the reference's codes, for every K mod 64 tail and odd row/token counts."""
    gemv, gemm = kernels
    rng = np.random.default_rng(rows * k)
    t = w8a8_tensor(rows, k, rng)
    x = rng.standard_normal((n, k)).astype(np.float32)
    q_ref, d_ref = reference.quantize_tokens(x)
    xq = np.empty((n, k), np.int8)
    d = np.empty(n, np.float32)
    sums = np.empty(n, np.int32)
    int8.quantize_tokens(x, 0.0, False, xq, d, sums)
    np.testing.assert_array_equal(xq, q_ref)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(sums, q_ref.sum(axis=1))
    h2f = np.ones(1 << 16, np.float32)  # every scale read as 1: the outputs are the integer dots
    ones = np.zeros_like(t.arrays["scales"]).view(np.uint16)
    no_zeros = np.zeros((1, 1), np.uint8)
    expect = (q_ref @ (t.arrays["codes"][:, :k].astype(np.int64) - 128).T).astype(np.float32)
    out = np.empty((n, rows), np.float32)
    gemm(t.arrays["codes"], ones, no_zeros, False, h2f, xq, np.ones(n, np.float32), sums, k, out)
    np.testing.assert_array_equal(out, expect)
    row = np.empty(rows, np.float32)
    gemv(t.arrays["codes"], ones, no_zeros, False, h2f, xq[0], np.float32(1.0), sums[0], k, row)
    np.testing.assert_array_equal(row, expect[0])


def test_vnni_kernels_compile_to_vpdpbusd():
    if not int8.VNNI:
        pytest.skip("this CPU has no AVX512-VNNI")
    from numba import njit

    for kernel, n in ((int8.gemm_w8a8_vnni, 2),):  # the GEMV uses the same intrinsic builder
        fresh = njit(parallel=True)(kernel.py_func)  # numba cannot inspect code loaded from its cache
        codes, h2f, scales, no_zeros = np.zeros((4, 128), np.uint8), np.ones(1 << 16, np.float32), \
            np.zeros((4, 1), np.uint16), np.zeros((1, 1), np.uint8)
        if n:
            fresh(codes, scales, no_zeros, False, h2f, np.zeros((n, 128), np.int8), np.ones(n, np.float32),
                  np.zeros(n, np.int32), 128, np.empty((n, 4), np.float32))
        else:
            fresh(codes, scales, no_zeros, False, h2f, np.zeros(128, np.int8), np.float32(1), np.int32(0), 128,
                  np.empty(4, np.float32))
        assert "vpdpbusd" in fresh.inspect_asm(fresh.signatures[0])


def test_static_codes_saturate():
    q, d = reference.quantize_tokens(np.array([[1.0, -1.0, 0.01]], np.float32), act_scale=0.001)
    assert q.tolist() == [[127, -127, 10]] and d.tolist() == [np.float32(0.001)]


def test_unknown_activation_mode_is_refused():
    t = w8a8_tensor(4, 16, np.random.default_rng(0))
    t.activation = {"bits": 4, "mode": "dynamic"}
    with pytest.raises(ValueError, match="activation"):
        linear_op("cpu", t)


# ---------------------------------------------------------------------------- SmoothQuant

def planted_layer(n=2048, k=512, rows=256, seed=0):
    """A linear layer whose inputs have 1% of channels 100x larger (LLM activation outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: k // 100]] *= 100.0
    w = torch.randn(rows, k, generator=g) / k ** 0.5
    return x, w


def rel_err(x, w, x_hat, w_hat) -> float:
    return float(torch.linalg.norm(x @ w.T - x_hat @ w_hat.T) / torch.linalg.norm(x @ w.T))


def test_smoothquant_brings_w8a8_near_w8a16_on_planted_outliers():
    from qformat.convert.groupquant import fake_quant
    from qformat.convert.smoothquant import fake_quant_tokens, smooth_scales

    scheme = parse_scheme("w8a8")
    x, w = planted_layer()
    w8a16 = rel_err(x, w, x, fake_quant(w, scheme))
    naive = rel_err(x, w, fake_quant_tokens(x), fake_quant(w, scheme))
    s = smooth_scales(x.abs().amax(0), [w], 0.5)
    smooth = rel_err(x, w, fake_quant_tokens(x / s), fake_quant(w * s, scheme))
    # measured: naive 5.1x, smoothed (α 0.5) 1.02x the weight-only error
    assert naive > 4 * w8a16  # the outlier channels set every token's scale: most codes unused
    assert smooth < 1.3 * w8a16  # migrated into the weights: close to weight-only int8


def test_static_calibrations_order_on_heavy_tails():
    """minmax keeps the whole range; percentile and KL clip the one rare large value; MSE clips
    less (the squared clipping error of that value outweighs finer rounding of the others)."""
    from qformat.convert.smoothquant import ACT_CALIBS, static_scale

    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 200.0  # one huge value
    scales = {how: static_scale([x], how) for how in ACT_CALIBS}
    assert scales["minmax"] == pytest.approx(200.0 / 127, rel=1e-6)
    for how in ("percentile", "kl"):
        assert scales[how] < scales["minmax"] / 10, how
    assert scales["percentile"] < scales["mse"] < scales["minmax"]


def test_folding_leaves_float_logits_unchanged(tiny_checkpoint):
    """SmoothQuant's folds (norms, o into v under GQA, down into up) give the same float model."""
    import json

    from transformers import AutoModelForCausalLM

    from qformat.convert.layerwise import InputStats
    from qformat.convert.smoothquant import SmoothQuantMethod

    folder = tiny_checkpoint("qwen2")  # GQA (4 heads, 2 KV heads) and a v bias
    config = json.loads((folder / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    sd = model.state_dict()
    hf = {"attn_norm": "input_layernorm.weight", "attn.wq": "self_attn.q_proj.weight",
          "attn.wk": "self_attn.k_proj.weight", "attn.wv": "self_attn.v_proj.weight",
          "attn.bv": "self_attn.v_proj.bias", "attn.wo": "self_attn.o_proj.weight",
          "ffn_norm": "post_attention_layernorm.weight", "ffn.w1": "mlp.gate_proj.weight",
          "ffn.w3": "mlp.up_proj.weight", "ffn.w2": "mlp.down_proj.weight"}
    method = SmoothQuantMethod(alpha=0.5, head_dim=head_dim)
    g = torch.Generator().manual_seed(1)

    def stats(k):  # only the channel maxima matter to SmoothQuant
        return InputStats(torch.zeros(0), torch.zeros(k), 1, torch.exp(2 * torch.randn(k, generator=g)))

    for i in range(config["num_hidden_layers"]):
        w = {k: sd[f"model.layers.{i}.{v}"].clone() for k, v in hf.items()}
        method.fold_scales(["attn.wq", "attn.wk", "attn.wv"], stats(w["attn.wq"].shape[1]), w, "attn_norm", {})
        method.fold_scales(["attn.wo"], stats(w["attn.wo"].shape[1]), w, "attn.wv", {})
        method.fold_scales(["ffn.w1", "ffn.w3"], stats(w["ffn.w1"].shape[1]), w, "ffn_norm", {})
        method.fold_scales(["ffn.w2"], stats(w["ffn.w2"].shape[1]), w, "ffn.w3", {})
        for k, v in hf.items():
            assert not torch.allclose(w[k], sd[f"model.layers.{i}.{v}"])  # every tensor really changed
            sd[f"model.layers.{i}.{v}"].copy_(w[k])
    model.load_state_dict(sd)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- converter and runtime

def float_reference(folder, path):
    """transformers with the file's dequantized weights and its activation quantization."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qformat import QbinReader
    from qformat.convert.architectures import TENSOR_MAP
    from qformat.convert.smoothquant import hook_activation_quantization

    reader = QbinReader(path)
    config = AutoConfig.from_pretrained(str(folder))
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    sd = {}
    for rule in TENSOR_MAP:
        for i in (range(reader.model.n_layers) if rule.per_layer else [None]):
            if rule.qbin_name(i) in reader:
                sd[rule.hf_name(i)] = torch.from_numpy(reader[rule.qbin_name(i)].dequantize().copy())
    sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    model.load_state_dict(sd, strict=False)
    return model, hook_activation_quantization(model, reader)


@pytest.mark.parametrize("options", [dict(), dict(smooth=0.5), dict(smooth=0.8, act_static=True, act_calib="kl"),
                                     dict(outlier_threshold=1.0)],
                         ids=["naive", "smooth", "smooth-static-kl", "llm-int8-columns"])
def test_w8a8_file_runtime_matches_reference(tiny_checkpoint, tmp_path, options):
    import qformat
    from qformat import QbinReader
    from qformat.convert import convert

    folder = tiny_checkpoint("llama")
    dst = tmp_path / "m.qbin"
    convert(folder, dst, "w8a8", progress=False, calib_samples=4, calib_seqlen=64, **options)
    reader = QbinReader(dst, verify=True)
    t = reader["layers.0.ffn.w2"]
    mode = "static" if options.get("act_static") else "dynamic"
    assert t.kind == "q8" and t.activation == {"bits": 8, "mode": mode}
    assert ("act_scale" in t.arrays) == (mode == "static") and "input_scale" not in t.arrays
    assert reader["tok_embeddings"].activation is None  # auto head/embeddings: int8 weight-only
    if "outlier_threshold" in options:  # LLM.int8(): 16-bit columns beside the int8 x int8 part
        assert any("fp_cols" in reader[n].arrays for n in reader.names() if n.startswith("layers."))
    elif options:
        assert "smoothquant" in reader.provenance.method
    ref_model, hooked = float_reference(folder, dst)
    assert hooked == 7 * reader.model.n_layers
    ids = np.arange(3, 40)
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids)[None]).logits[0].numpy()
    model = qformat.load(dst)
    got = model.logits(ids)  # prefill: the int8 GEMM
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-2 * scale  # a rounding tie may flip one activation code
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    tr = model.transformer  # decode: the fused one-call step runs per-channel W8A8 too
    assert tr.fused is not None
    fused = np.stack([tr.forward([t], p) for p, t in enumerate(ids[:6])])
    tr.fused = None
    per_op = np.stack([tr.forward([t], p) for p, t in enumerate(ids[:6])])
    assert np.abs(fused - per_op).max() <= 1e-4 * scale
    assert np.abs(per_op - ref[:6]).max() <= 1e-2 * scale


@pytest.mark.parametrize("args,message", [
    (["--smooth", "1.5"], "must lie in [0, 1]"),
    (["--smooth", "0.5", "--scheme-override", "int4-g64"], "float activations"),
    (["--act-calib", "kl"], "add --act-static"),
    (["--smooth", "0.5", "--method", "awq"], "--method awq"),
    (["--smooth", "0.5", "--outlier-threshold", "6"], "do not combine"),
])
def test_cli_errors(tiny_checkpoint, tmp_path, args, message):
    from click.testing import CliRunner

    from qformat.convert.cli import main

    scheme = "w8a8"
    if "--scheme-override" in args:
        i = args.index("--scheme-override")
        scheme = args[i + 1]
        args = args[:i] + args[i + 2:]
    result = CliRunner().invoke(main, [str(tiny_checkpoint("llama")), str(tmp_path / "o.qbin"), "--scheme", scheme,
                                       *args, "-q"], standalone_mode=True)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.qbin").exists()


def test_scheme_name():
    s = parse_scheme("w8a8")
    assert (s.kind, s.group_size, s.symmetric, s.act_bits) == ("q8", 0, True, 8)
    assert parse_scheme("int8").act_bits == 0
