"""Quantized Hugging Face folders both ways (convert/hf_export.py, hf_import.py, hf_packing.py).

Packings are checked against compressed-tensors' own packer and against AutoGPTQ's and
AutoAWQ's packing loops (restated here as they are written there); exports load in
transformers through compressed-tensors and give qrun's logits; round trips through both
layouts give back the same weights; a folder written by compressed-tensors' ModelCompressor
(the writer llm-compressor uses) imports and matches transformers on it; what cannot be
mapped is refused with one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402

import qformat  # noqa: E402
from qformat import tensors as T  # noqa: E402
from qformat.convert import ConvertError, convert, export_hf, import_hf_quantized  # noqa: E402
from qformat.convert.architectures import TENSOR_MAP  # noqa: E402
from qformat.convert.cli import export as qexport  # noqa: E402
from qformat.convert.cli import main as qconvert  # noqa: E402
from qformat.convert.hf_config import hf_config_of, model_args  # noqa: E402
from qformat.convert.hf_export import LAYOUTS  # noqa: E402
from qformat.convert.hf_import import FORMATS  # noqa: E402
from qformat.convert.hf_packing import AWQ_ORDER, awq_deinterleave, awq_interleave, pack_int32, unpack_int32  # noqa: E402
from qformat.reader import QbinReader  # noqa: E402

# dimensions that groups of 32 divide (the default tiny model's 80 columns do not)
DIMS = dict(hidden_size=64, intermediate_size=128)
IDS = [int(i) for i in np.random.default_rng(5).integers(5, 300, 20)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "ck", tied=False, seed=3, config_overrides=DIMS)


@pytest.fixture(scope="module")
def qbins(ckpt, tmp_path_factory):
    """qbin files of the tiny model in the grids the layouts hold."""
    d = tmp_path_factory.mktemp("qbins")
    plans = {
        "asym": ("int4-g32", {"head": "f16"}),
        "sym": ("int4-g32-sym", {}),  # int8 head: a second config group
        "w8a8": ("w8a8", {}),
        "int3": ("int3-g32", {"head": "f16"}),
        "gptq-act-order": ("int4-g32", {"head": "f16", "method": "gptq", "calib": "pydoc", "calib_samples": 4,
                                        "act_order": True, "static_groups": False}),  # g_idx
        "gptq-static": ("int4-g32-sym", {"head": "f16", "method": "gptq", "calib": "pydoc", "calib_samples": 4,
                                         "act_order": True, "static_groups": True}),
        "outliers": ("int4-g32", {"head": "f16", "outliers": 0.01}),
    }
    out = {}
    for key, (scheme, kw) in plans.items():
        out[key] = d / f"{key}.qbin"
        convert(ckpt, out[key], scheme, **kw)
    return out


def _transformers_logits(folder, dequantize: bool = False) -> np.ndarray:
    extra = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def _reference_logits(ckpt, qbin) -> np.ndarray:
    """transformers in float32 on the qbin's dequantized weights: the model both runtimes compute."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    reader = QbinReader(qbin)
    rules = {rule.tensor: rule for rule in TENSOR_MAP}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in reader.names():
            parsed = T.parse_name(name)
            if parsed is not None:
                params[rules[parsed[0]].hf_name(parsed[1])].copy_(torch.from_numpy(reader[name].dequantize()))
        return model(torch.tensor([IDS])).logits[0].numpy()


def _same_weights(a_path, b_path, exact_arrays: bool = True) -> None:
    a, b = QbinReader(a_path), QbinReader(b_path)
    assert a.names() == b.names()
    for name in a.names():
        ta, tb = a[name], b[name]
        if ta.kind in ("bytes", "xz"):
            continue
        if name == "tok_embeddings" and ta.kind != tb.kind:  # written dequantized in float16
            np.testing.assert_allclose(tb.dequantize(), ta.dequantize(), atol=1e-3 * np.abs(ta.dequantize()).max())
            continue
        assert (ta.kind, ta.group_size, ta.symmetric, ta.activation) == (tb.kind, tb.group_size, tb.symmetric,
                                                                       tb.activation), name
        if "perm" in ta.arrays or not exact_arrays:  # GPTQ's g_idx does not keep the order within a group
            np.testing.assert_array_equal(tb.dequantize(), ta.dequantize())
        else:
            assert sorted(ta.arrays) == sorted(tb.arrays), name
            for role in ta.arrays:
                np.testing.assert_array_equal(tb.arrays[role], ta.arrays[role], err_msg=f"{name}.{role}")


# ---------------------------------------------------------------------------- packings


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_int32_is_compressed_tensors_packing(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    u = np.random.default_rng(bits).integers(0, 1 << bits, (6, 77)).astype(np.uint8)
    signed = torch.from_numpy(u.astype(np.int16) - (1 << (bits - 1))).to(torch.int8)
    np.testing.assert_array_equal(pack_int32(u, bits), ct.pack_to_int32(signed, bits).numpy())
    np.testing.assert_array_equal(pack_int32(u.T, bits).T, ct.pack_to_int32(signed, bits, packed_dim=0).numpy())
    np.testing.assert_array_equal(unpack_int32(pack_int32(u, bits), 77, bits), u)
    with pytest.raises(ValueError, match="does not fit"):
        pack_int32(np.full((1, 3), 1 << bits), bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_qweight_is_autogptqs_loop(bits):
    """AutoGPTQ's QuantLinear.pack: qweight[row] |= intweight[j] << (bits·(j − i)) over K."""
    k, r = 64, 24
    intweight = np.random.default_rng(bits).integers(0, 1 << bits, (k, r)).astype(np.uint32)
    qweight = np.zeros((k // 32 * bits, r), np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 32 // bits):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    np.testing.assert_array_equal(pack_int32(intweight.T, bits).T, qweight.view(np.int32))


def test_awq_packing_is_autoawqs_loop():
    """AutoAWQ's WQLinear_GEMM.from_linear: qweight[:, col] |= intweight[:, col·8 + order_map[i]] << 4i."""
    k, r = 16, 32
    intweight = np.random.default_rng(0).integers(0, 16, (k, r)).astype(np.uint32)
    qweight = np.zeros((k, r // 8), np.uint32)
    for col in range(r // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    np.testing.assert_array_equal(pack_int32(awq_interleave(intweight), 4), qweight.view(np.int32))
    np.testing.assert_array_equal(awq_deinterleave(unpack_int32(qweight.view(np.int32), r, 4)), intweight)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_hf_config_of_inverts_model_args(arch, tmp_path):
    folder = make_tiny_checkpoint(tmp_path / arch, arch=arch, tied=arch == "qwen2")
    config = json.loads((folder / "config.json").read_text())
    args = model_args(config)
    assert model_args(hf_config_of(args)) == args


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("key,dequantize", [("sym", False), ("asym", True), ("w8a8", False), ("gptq-static", False)])
def test_compressed_tensors_export_loads_in_transformers(qbins, ckpt, tmp_path, key, dequantize):
    """transformers + compressed-tensors decompress the folder to qrun's weights: logits equal
    the float32 model on them to float16 rounding, and qrun's to its int8-activation error.
    (transformers 5 loads asymmetric folders only with dequantize=True, and that path only
    for one config group; W8A8 runs int8 activations in both runtimes. GPTQ with act-order
    exports as it is with --static-groups.)"""
    pytest.importorskip("compressed_tensors")
    report = export_hf(qbins[key], tmp_path / "ct", "compressed-tensors")
    assert report.grids and "tok_embeddings" in report.dequantized
    want = _transformers_logits(tmp_path / "ct", dequantize)
    scale = np.abs(want).max()
    if key != "w8a8":
        ref = _reference_logits(ckpt, qbins[key])
        assert np.abs(want - ref).max() <= 5e-3 * scale
    got = qformat.load(qbins[key]).logits(IDS)
    assert np.abs(got - want).max() <= 3e-2 * scale
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (tmp_path / "ct" / "tokenizer.json").is_file() and (tmp_path / "ct" / "generation_config.json").is_file()


def test_tied_model_exports_with_its_head_in_float(tmp_path):
    """A tied model's head is the (float16) embedding: "Linear" targets must not take lm_head."""
    folder = make_tiny_checkpoint(tmp_path / "tied", tied=True, seed=6, config_overrides=DIMS)
    convert(folder, tmp_path / "t.qbin", "int4-g32-sym")
    export_hf(tmp_path / "t.qbin", tmp_path / "ct", "compressed-tensors")
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert q["ignore"] == ["lm_head"] and q["config_groups"]["group_0"]["targets"] == ["Linear"]
    want = _transformers_logits(tmp_path / "ct")
    got = qformat.load(tmp_path / "t.qbin").logits(IDS)
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()


@pytest.mark.parametrize("key,layout", [("sym", "compressed-tensors"), ("asym", "compressed-tensors"),
                                        ("w8a8", "compressed-tensors"), ("int3", "compressed-tensors"),
                                        ("asym", "gptq"), ("gptq-act-order", "gptq"),
                                        ("gptq-static", "compressed-tensors")])
def test_round_trip_gives_back_the_weights(qbins, tmp_path, key, layout):
    export_hf(qbins[key], tmp_path / "out", layout)
    report = import_hf_quantized(tmp_path / "out", tmp_path / "back.qbin")
    assert "without requantization" in report.notes[0]
    _same_weights(qbins[key], tmp_path / "back.qbin")
    if layout == "gptq":
        q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
        assert (q["bits"], q["group_size"], q["desc_act"]) == (4, 32, key == "gptq-act-order")
    else:
        q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
        assert q["format"] == ("int-quantized" if key == "w8a8" else "pack-quantized") or len(q["config_groups"]) > 1


def test_gptq_zero_point_zero_is_written_as_v2(qbins, tmp_path):
    """v1 qzeros store z − 1, so z = 0 takes checkpoint_format gptq_v2."""
    src = QbinReader(qbins["asym"])
    forced = tmp_path / "zero.qbin"
    from qformat.writer import QbinWriter

    with QbinWriter(forced) as w:
        for name in src.names():
            t = src[name]
            if t.kind == "q4" and "zeros" in t.arrays:
                zeros = np.array(t.arrays["zeros"])
                zeros[0, 0] = 0
                t.arrays = dict(t.arrays, zeros=zeros)
            w.add_tensor(t)
        w.finish(model=src.model, tokenizer=src.tokenizer, chat_template=src.chat_template, provenance=src.provenance)
    report = export_hf(forced, tmp_path / "g", "gptq")
    assert any("gptq_v2" in n for n in report.notes)
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["checkpoint_format"] \
        == "gptq_v2"
    import_hf_quantized(tmp_path / "g", tmp_path / "back.qbin")
    _same_weights(forced, tmp_path / "back.qbin")


def test_what_a_layout_cannot_hold_is_refused_or_folded(qbins, tmp_path):
    with pytest.raises(ConvertError, match="act-order.*--to gptq"):
        export_hf(qbins["gptq-act-order"], tmp_path / "a", "compressed-tensors")
    with pytest.raises(ConvertError, match="sparse outliers.*--fold"):
        export_hf(qbins["outliers"], tmp_path / "b", "gptq")
    with pytest.raises(ConvertError, match="W8A8"):
        export_hf(qbins["w8a8"], tmp_path / "c", "gptq")
    with pytest.raises(ConvertError, match="3-bit"):
        export_hf(qbins["int3"], tmp_path / "d", "gptq")
    assert not any(tmp_path.iterdir())  # nothing written, no temporary folder left
    report = export_hf(qbins["outliers"], tmp_path / "e", "compressed-tensors", fold=True)
    assert report.folded and 0 < max(report.folded.values()) < 0.2
    assert "--fold requantized" in report.summary()
    report = export_hf(qbins["gptq-act-order"], tmp_path / "f", "compressed-tensors", fold=True)
    assert len(report.folded) == 14


def test_export_cli(qbins, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(qexport, [str(qbins["w8a8"]), "--to", "gptq", str(tmp_path / "g")])
    assert ok.exit_code == 2 and "W8A8" in ok.output and len(ok.output.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists()
    ok = runner.invoke(qexport, [str(qbins["asym"]), "--to", "gptq", str(tmp_path / "g")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(qexport, [str(qbins["asym"]), "--to", "gptq", str(tmp_path / "g")])
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(qexport, [str(qbins["asym"]), "--to", "gptq", str(tmp_path / "g"), "--force"]).exit_code == 0
    bad = runner.invoke(qexport, [str(qbins["asym"]), "--to", "gguf", str(tmp_path / "x.gguf"), "--fold"])
    assert bad.exit_code == 2 and "--requantize" in bad.output
    imported = runner.invoke(qconvert, [str(tmp_path / "g"), str(tmp_path / "back.qbin")])
    assert imported.exit_code == 0, imported.output
    refused = runner.invoke(qconvert, [str(tmp_path / "g"), str(tmp_path / "b2.qbin"), "--method", "awq"])
    assert refused.exit_code == 2 and "already quantized" in refused.output


# ---------------------------------------------------------------------------- import


def _peer_compressed_tensors(ckpt, dst, symmetric: bool):
    """A W4A16 g32 folder written by compressed-tensors' ModelCompressor, as llm-compressor saves
    one (min-max scales computed here, rounded to float16 so qbin holds them exactly)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 32}
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]))
    with torch.no_grad():
        for m in model.modules():
            if not hasattr(m, "weight_scale"):
                continue
            w = m.weight.reshape(m.weight.shape[0], -1, 32)
            if symmetric:
                m.weight_scale.copy_((w.abs().amax(-1) / 7.5).half().float())
            else:
                lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
                s = ((hi - lo) / 15).half().float()
                m.weight_scale.copy_(s)
                m.weight_zero_point.copy_((torch.round(-lo / s) - 8).clamp(-8, 7).to(torch.int8))
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / f, dst / f)
    assert ct is not None
    return dst


@pytest.mark.parametrize("symmetric", [True, False])
def test_peer_compressed_tensors_folder_imports_and_matches(ckpt, tmp_path, symmetric):
    folder = _peer_compressed_tensors(ckpt, tmp_path / "peer", symmetric)
    assert "weight_packed" in " ".join(load_file(folder / "model.safetensors"))
    report = import_hf_quantized(folder, tmp_path / "m.qbin")
    assert "14 quantized layers" in report.notes[0]
    reader = QbinReader(tmp_path / "m.qbin")
    assert reader["layers.0.attn.wq"].kind == "q4" and reader["layers.0.attn.wq"].symmetric == symmetric
    want = _transformers_logits(folder, dequantize=not symmetric)
    got = qformat.load(tmp_path / "m.qbin").logits(IDS)
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
    # the weights are the peer's: transformers' decompressed linears equal qbin's dequantized ones
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    dense = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].detach().numpy()
    np.testing.assert_allclose(reader["layers.0.attn.wq"].dequantize(), dense, rtol=0, atol=1e-6)


def _awq_folder(ckpt, dst):
    """A tiny AutoAWQ GEMM folder packed by AutoAWQ's loop (restated above)."""
    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / f, dst / f)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                     "version": "gemm"}
    (dst / "config.json").write_text(json.dumps(config))
    state = load_file(ckpt / "model.safetensors")
    rng = np.random.default_rng(1)
    expected = {}
    out = {}
    for name, w in state.items():
        if not name.endswith("_proj.weight"):
            out[name] = w
            continue
        r, k = w.shape
        q = rng.integers(0, 16, (k, r)).astype(np.uint32)
        z = rng.integers(0, 16, (k // 32, r)).astype(np.uint32)
        s = (rng.random((k // 32, r)) * 0.02 + 0.001).astype(np.float16)
        qweight = np.zeros((k, r // 8), np.uint32)
        qzeros = np.zeros((k // 32, r // 8), np.uint32)
        for col in range(r // 8):
            for i in range(8):
                qweight[:, col] |= q[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
                qzeros[:, col] |= z[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
        module = name.removesuffix(".weight")
        out |= {f"{module}.qweight": qweight.view(np.int32), f"{module}.qzeros": qzeros.view(np.int32),
                f"{module}.scales": s}
        expected[module] = ((q.astype(np.float32) - np.repeat(z, 32, axis=0)) * np.repeat(s, 32, axis=0)).T
    save_file(out, dst / "model.safetensors")
    return expected


def test_awq_folder_imports_exactly(ckpt, tmp_path):
    expected = _awq_folder(ckpt, tmp_path / "awq")
    import_hf_quantized(tmp_path / "awq", tmp_path / "m.qbin")
    reader = QbinReader(tmp_path / "m.qbin")
    np.testing.assert_array_equal(reader["layers.1.ffn.w2"].dequantize(), expected["model.layers.1.mlp.down_proj"])
    np.testing.assert_array_equal(reader["layers.0.attn.wk"].dequantize(), expected["model.layers.0.self_attn.k_proj"])


def test_bad_quantized_folders_are_refused(qbins, tmp_path):
    export_hf(qbins["asym"], tmp_path / "g", "gptq")
    state = load_file(tmp_path / "g" / "model.safetensors")
    config = json.loads((tmp_path / "g" / "config.json").read_text())

    def variant(name, state_change=None, config_change=None):
        d = tmp_path / name
        shutil.copytree(tmp_path / "g", d)
        if state_change:
            save_file(state_change(dict(state)), d / "model.safetensors")
        if config_change:
            c = json.loads(json.dumps(config))
            config_change(c["quantization_config"])
            (d / "config.json").write_text(json.dumps(c))
        return d

    cases = [
        (variant("shape", lambda s: s | {"model.layers.0.mlp.up_proj.qweight": s["model.layers.0.mlp.up_proj.qweight"][:4]}),
         "qweight has shape"),
        (variant("missing", lambda s: {k: v for k, v in s.items() if k != "model.layers.1.self_attn.v_proj.qzeros"}),
         "qzeros is missing"),
        (variant("bits", config_change=lambda q: q.update(bits=3)), "3 bits"),
        (variant("method", config_change=lambda q: q.update(quant_method="bitnet")), "bitnet"),
        (variant("gidx", lambda s: s | {"model.layers.0.mlp.up_proj.g_idx": np.full(64, 9, np.int32)}), "g_idx"),
    ]
    for folder, message in cases:
        with pytest.raises(ConvertError, match=message):
            convert(folder, tmp_path / "x.qbin")
        assert not (tmp_path / "x.qbin").exists()
    assert set(FORMATS) == {"gptq", "awq", "compressed-tensors"} and set(LAYOUTS) == {"gptq", "compressed-tensors"}


def test_static_groups_cli(ckpt, tmp_path):
    runner = CliRunner()
    out = tmp_path / "s.qbin"
    ok = runner.invoke(qconvert, [str(ckpt), str(out), "-s", "int4-g32", "--method", "gptq", "--calib", "pydoc",
                                  "--calib-samples", "4", "--static-groups", "-q"])
    assert ok.exit_code == 0, ok.output
    reader = QbinReader(out)
    assert not any("perm" in reader[n].arrays for n in reader.names())
    assert "static_groups=True" in reader.provenance.method
    bad = runner.invoke(qconvert, [str(ckpt), str(tmp_path / "b.qbin"), "-s", "int4-g32", "--static-groups"])
    assert bad.exit_code == 2 and "GPTQ option" in bad.output and not (tmp_path / "b.qbin").exists()
