"""Quantization-aware training (convert/qat.py): the straight-through fake quantizer, Block-AP on a
synthetic layer against GPTQ, E2E-QP's reach, and `--method qat` conversions end to end."""
from __future__ import annotations

import re


import numpy as np
import pytest
import torch

from qbin_testutil import model_args
from qformat import QbinReader
from qformat import tensors as T
from qformat.convert import convert
from qformat.convert.gptq import GptqMethod
from qformat.convert.groupquant import quantize_to_tensor
from qformat.convert.layerwise import LayerReport, layer_forward, quantize_layer, rope_tables
from qformat.convert.plan import ConvertError
from qformat.convert.qat import GroupFakeQuant, Kept, QatOptions, FrozenGrid, block_ap, tensor_params
from qformat.schemes import parse_scheme

TRAINED_SCHEMES = ["int4-g64", "int3-g64", "int2-g64", "int4-g64-sym", "int3-g64-dq", "int8"]
PROJECTIONS = [t.key for t in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)]


def _fake(scheme_name: str, rows: int = 8, k: int = 100, seed: int = 0) -> tuple[GroupFakeQuant, torch.Tensor]:
    """A fake quantizer over a random weight (k = 100: a partial last group of 64)."""
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    scheme = parse_scheme(scheme_name)
    return GroupFakeQuant(w, quantize_to_tensor("w", w, scheme), scheme), w


@pytest.mark.parametrize("scheme_name", TRAINED_SCHEMES)
def test_fake_quant_starts_at_the_init_and_stores_exactly_what_it_computes(scheme_name):
    m, w = _fake(scheme_name)
    init = quantize_to_tensor("w", w, m.scheme)
    t, w_hat = m.stored("w")
    assert np.array_equal(t.dequantize(), init.dequantize())  # the init's codes, untouched
    with torch.no_grad():  # train-like perturbation, then the file holds the forward's values
        m.weight.add_(0.3 * torch.randn_like(m.weight))
        m.scale.mul_(1.07)
        if m.asymmetric:
            m.zero.add_(0.6)
    t, w_hat = m.stored("w")
    assert np.array_equal(t.dequantize(), m().detach().numpy())
    assert np.array_equal(t.dequantize(), w_hat.numpy())
    assert not np.array_equal(t.dequantize(), init.dequantize())


@pytest.mark.parametrize("fp_cols", [None, np.array([3, 70])])
def test_fake_quant_keeps_the_permutation_and_the_16_bit_weights(fp_cols):
    """GPTQ with act-order (a stored permutation), outliers and 16-bit columns: the kept weights
    stay exactly as stored while the grid trains around them."""
    from qformat.convert.gptq import gptq_quantize

    scheme = parse_scheme("int3-g64")
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(8, 100, generator=g), torch.randn(400, 100, generator=g)
    init = gptq_quantize(w, x.T @ x, scheme, act_order=True, outliers=12, fp_cols=fp_cols).tensor("w", scheme)
    assert {"perm", "outlier_values"} <= set(init.arrays)
    m = GroupFakeQuant(w, init, scheme)
    assert np.array_equal(m.stored("w")[0].dequantize(), init.dequantize())
    with torch.no_grad():
        m.weight.add_(0.5 * torch.randn_like(m.weight))
        m.scale.mul_(0.9)
    t, w_hat = m.stored("w")
    assert set(t.arrays) == set(init.arrays)
    kept = m.kept.mask.numpy()
    assert np.array_equal(t.dequantize()[kept], init.dequantize()[kept])
    assert np.array_equal(t.dequantize(), m().detach().numpy())
    assert not np.array_equal(t.dequantize(), init.dequantize())


@pytest.mark.parametrize("scheme_name", ["int3-g64", "int4-g64-sym"])
def test_ste_scale_gradient_is_lsq(scheme_name):
    """d ŵ/ds = round(w/s) − w/s inside the grid and (code − z) where the code is clamped: the
    straight-through estimator's gradient (LSQ), summed over each group's columns."""
    m, _ = _fake(scheme_name)
    g = torch.randn(m.rows, m.k, generator=torch.Generator().manual_seed(3))
    (m() * g).sum().backward()
    s, z = (p.detach().repeat_interleave(m.group, 1)[:, :m.k] for p in m.group_params())
    v = m.weight.detach() / s
    code = torch.round(v) + z
    inside = (code >= 0) & (code <= m.top)
    dwds = torch.where(inside, torch.round(v) - v, code.clamp(0, m.top) - z)
    groups = -(-m.k // m.group)
    expect = torch.stack([(g * dwds)[:, j * m.group:(j + 1) * m.group].sum(1) for j in range(groups)], 1)
    assert torch.allclose(m.scale.grad, expect, rtol=1e-5, atol=1e-5)


def test_e2e_scale_gradient_matches_finite_difference():
    """With the codes frozen (E2E-QP) the weight is linear in each scale: the autograd gradient of
    a quadratic loss equals the central difference (scales and steps exact in float16)."""
    codes = torch.randint(0, 8, (4, 96), generator=torch.Generator().manual_seed(0)).float()
    zero = torch.full((4, 2), 3.0)
    scale = torch.full((4, 2), 2.0**-6)
    target = torch.randn(4, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    f = FrozenGrid(codes, zero, torch.nn.Parameter(scale.clone()), parse_scheme("int3-g64"), 64,
                Kept(None, None, None, None, None))
    loss = lambda: ((f.weight() - target) ** 2).sum()  # noqa: E731
    loss().backward()
    h = 2.0**-12
    for r, j in [(0, 0), (2, 1), (3, 0)]:
        with torch.no_grad():
            f.scale[r, j] += h
            up = float(loss())
            f.scale[r, j] -= 2 * h
            down = float(loss())
            f.scale[r, j] += h
        assert f.scale.grad[r, j].item() == pytest.approx((up - down) / (2 * h), rel=1e-4)


def _synthetic_layer(seed: int = 0):
    """A llama-style layer with correlated, unequal-scale inputs: fresh samples of the same
    distribution test what Block-AP learned."""
    args = model_args(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, rope_scaling=None)
    g = torch.Generator().manual_seed(seed)
    shapes = {T.ATTN_Q.key: (64, 64), T.ATTN_K.key: (32, 64), T.ATTN_V.key: (32, 64), T.ATTN_OUT.key: (64, 64),
              T.FFN_GATE.key: (128, 64), T.FFN_UP.key: (128, 64), T.FFN_DOWN.key: (64, 128)}
    w = {n: torch.randn(*s, generator=g) / s[1] ** 0.5 for n, s in shapes.items()}
    w[T.ATTN_NORM.key] = 1 + 0.1 * torch.randn(64, generator=g)
    w[T.FFN_NORM.key] = 1 + 0.1 * torch.randn(64, generator=g)
    mix = torch.randn(64, 64, generator=g) / 8 * (0.5 + 2 * torch.rand(64, generator=g))

    def inputs(n: int, s: int) -> torch.Tensor:
        return torch.randn(n, 32, 64, generator=torch.Generator().manual_seed(s)) @ mix

    return args, w, inputs


def test_block_ap_lowers_the_layer_error_below_gptq_on_fresh_inputs():
    args, w_float, inputs = _synthetic_layer()
    rope = rope_tables(args, 32, torch.device("cpu"))
    x, fresh = inputs(128, 1), inputs(16, 2)
    scheme = parse_scheme("int2-g64")  # at 3 bits GPTQ is near the optimum of this random layer
    schemes = {n: scheme for n in PROJECTIONS}
    with torch.no_grad():
        target = layer_forward(x, w_float, args, rope, 0)
        w = {n: v.clone() for n, v in w_float.items()}
        _, stored, refs = quantize_layer(x, w, args, rope, GptqMethod(act_order=True, static_groups=True), schemes,
                                         LayerReport(0))
        gptq_w = {n: v.clone() for n, v in w.items()}
        trained, before, after = block_ap(x, target, w, refs, stored, schemes, args, rope, 0,
                                          QatOptions(epochs=4, lr=1e-3, weight_lr=3e-3))
        ref = layer_forward(fresh, w_float, args, rope, 0)
        err_gptq = float(((layer_forward(fresh, gptq_w, args, rope, 0) - ref) ** 2).mean())
        err_qat = float(((layer_forward(fresh, w, args, rope, 0) - ref) ** 2).mean())
    assert after < before
    assert err_qat < 0.8 * err_gptq, (err_qat, err_gptq)
    for n in PROJECTIONS:  # w holds exactly what is stored
        assert np.array_equal(trained[n].dequantize(), w[n].numpy())


def test_block_ap_keeps_the_init_when_training_cannot_help():
    """A learning rate that only hurts: the held-out check keeps the init's tensors."""
    args, w_float, inputs = _synthetic_layer()
    rope = rope_tables(args, 32, torch.device("cpu"))
    x = inputs(16, 1)
    schemes = {n: parse_scheme("int4-g64") for n in PROJECTIONS}
    with torch.no_grad():
        target = layer_forward(x, w_float, args, rope, 0)
        w = {n: v.clone() for n, v in w_float.items()}
        _, stored, refs = quantize_layer(x, w, args, rope, GptqMethod(), schemes, LayerReport(0))
        trained, before, after = block_ap(x, target, w, refs, stored, schemes, args, rope, 0,
                                          QatOptions(epochs=1, lr=1.0, weight_lr=1.0))
    assert after == before
    for n in PROJECTIONS:
        assert np.array_equal(trained[n].dequantize(), stored[n].dequantize())


# E2E-QP off unless a test turns it on: the tests check each phase on its own
QAT = dict(method="qat", calib="pydoc", calib_samples=16, calib_seqlen=32, progress=False, force=True, e2e_steps=0)


def _arrays(path) -> dict[str, dict[str, np.ndarray]]:
    r = QbinReader(path)
    try:
        return {n: {k: np.array(a) for k, a in r.get(n).arrays.items()} for n in r.names()}
    finally:
        r.close()


def test_qat_conversion_is_seeded(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint()
    paths = [tmp_path / f"{n}.qbin" for n in "ab"]
    for path in paths:
        convert(src, path, "int2-g64", **QAT, qat_epochs=2, seed=3)
    a, b = map(_arrays, paths)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[n][k], b[n][k]) for n in a for k in a[n])
    method = QbinReader(paths[0]).provenance.method
    assert "qat(init=gptq(" in method and "block_ap(epochs=2" in method and "seed=3" in method


def test_e2e_qp_changes_only_the_scales(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint()
    convert(src, tmp_path / "a.qbin", "int3-g64", **QAT)
    convert(src, tmp_path / "b.qbin", "int3-g64", **dict(QAT, e2e_steps=8, e2e_lr=1e-3))
    base, e2e = _arrays(tmp_path / "a.qbin"), _arrays(tmp_path / "b.qbin")
    scales_moved = 0
    for name, arrays in base.items():
        for role, a in arrays.items():
            if role == "scales" and T.parse_name(name)[0].role == "linear":
                scales_moved += not np.array_equal(a, e2e[name][role])
            else:
                assert np.array_equal(a, e2e[name][role]), (name, role)
    assert scales_moved > 0


def test_e2e_kl_teacher_is_the_float_model(tiny_checkpoint, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from qformat.convert import qat
    from qformat.convert.layerwise import rms_norm

    seen = {}

    def capture(items, args, tokens, opts, device, progress, teacher=None):
        seen.update(tokens=tokens, teacher=teacher, args=args)
        return items

    monkeypatch.setattr(qat, "e2e_qp", capture)
    src = tiny_checkpoint()
    convert(src, tmp_path / "k.qbin", "int2-g64", **dict(QAT, e2e_steps=1, e2e_loss="kl"))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(torch.as_tensor(np.asarray(seen["tokens"])), output_hidden_states=True).hidden_states[-1]
    ours = rms_norm(seen["teacher"], model.model.norm.weight.detach(), seen["args"].norm_eps)
    assert seen["teacher"].shape == hf.shape
    assert torch.allclose(ours, hf, atol=1e-4, rtol=1e-4), float((ours - hf).abs().max())
    convert(src, tmp_path / "c.qbin", "int2-g64", **dict(QAT, e2e_steps=1, e2e_loss="ce"))
    assert seen["teacher"] is None


def test_qat_with_outliers_keeps_the_init_sidecars(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint()
    kw = dict(QAT, calib_samples=32, outliers=0.01, qat_lr=1e-3, qat_weight_lr=1e-2)
    convert(src, tmp_path / "a.qbin", "int3-g64", **dict(kw, e2e_steps=4, e2e_lr=1e-3))
    convert(src, tmp_path / "g.qbin", "int3-g64", **dict(kw, qat_epochs=0))
    trained, init = QbinReader(tmp_path / "a.qbin"), QbinReader(tmp_path / "g.qbin")
    names = [n for n in init.names() if "outlier_values" in init.get(n).arrays]
    assert names
    for n in names:
        a, b = trained.get(n), init.get(n)
        for role in ("perm", "outlier_rowptr", "outlier_cols", "outlier_values"):
            assert np.array_equal(np.asarray(a.arrays[role]), np.asarray(b.arrays[role])), (n, role)


def test_qat_file_runs_in_the_runtime(tiny_checkpoint, tmp_path):
    import qformat

    path = tmp_path / "q.qbin"
    convert(tiny_checkpoint(), path, "int4-g64", **dict(QAT, qat_init="rtn", e2e_steps=2))
    model = qformat.load(path, threads=1)
    assert len(list(model.generate("Numbers:", max_tokens=4))) >= 1
    assert "qat(init=rtn" in QbinReader(path).provenance.method


@pytest.mark.parametrize("extra, needle", [
    (dict(method="gptq", qat_epochs=3), "--qat-epochs is an option of --method qat"),
    (dict(method="qat", scheme="nf4-g64"), "uniform integer grids"),
    (dict(method="qat", prune="2:4"), "--prune does not combine with --method qat"),
    (dict(method="qat", qat_init="imatrix"), "--qat-init 'imatrix'"),
    (dict(method="qat", e2e_steps=-1), ">= 0"),
])
def test_qat_refuses_what_it_cannot_train(tiny_checkpoint, tmp_path, extra, needle):
    kwargs = dict(QAT, **extra)
    with pytest.raises(ConvertError, match=re.escape(needle)):
        convert(tiny_checkpoint(), tmp_path / "x.qbin", kwargs.pop("scheme", "int3-g64"), **kwargs)
    assert not (tmp_path / "x.qbin").exists()


def test_tensor_params_round_trip():
    scheme = parse_scheme("int3-g64-dq")
    w = torch.randn(6, 100, generator=torch.Generator().manual_seed(4))
    t = quantize_to_tensor("w", w, scheme)
    codes, scales, zeros = tensor_params(t, scheme)
    s = scales.repeat_interleave(64, 1)[:, :100]
    z = zeros.repeat_interleave(64, 1)[:, :100]
    assert np.array_equal(((codes - z) * s).numpy(), t.dequantize())


def test_qconvert_trains_with_the_qat_flags(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from qformat.convert.cli import main

    out = tmp_path / "m.qbin"
    args = [str(tiny_checkpoint()), str(out), "-s", "int3-g64", "--method", "qat", "--qat-init", "rtn",
            "--qat-epochs", "1", "--qat-lr", "2e-5", "--qat-weight-lr", "1e-4", "--qat-samples", "8",
            "--qat-batch", "4", "--e2e-steps", "1", "--e2e-lr", "1e-5", "--e2e-batch", "1", "--e2e-loss", "kl",
            "--seed", "5", "--calib", "pydoc", "--calib-samples", "12", "--calib-seqlen", "32", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    method = QbinReader(out).provenance.method
    for part in ("qat(init=rtn", "epochs=1", "lr=2e-05", "weight_lr=0.0001", "samples=8", "batch=4",
                 "e2e_qp(steps=1, lr=1e-05, batch=1, loss=kl)", "seed=5"):
        assert part in method, (part, method)
    refused = CliRunner().invoke(main, [str(tiny_checkpoint()), str(tmp_path / "x.qbin"), "-s", "int3-g64",
                                        "--e2e-steps", "4"])
    assert refused.exit_code == 2 and "--e2e-steps is an option of --method qat" in refused.stderr
