"""qinfo: what it reports about a valid file (error handling is in test_corruption.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from qbin_testutil import TOKENIZER_BYTES, metadata, model_args, write_sample
from qformat import QbinWriter, parse_scheme
from qformat.qinfo import main as qinfo
from qformat.tensors import tensor_group as tensor_class

EXPECTED_CLASS = {  # name -> class, for every name of the tensor contract (spec §3.1)
    "tok_embeddings": "embeddings",
    "layers.0.attn_norm": "norms", "layers.11.ffn_norm": "norms", "norm": "norms",
    "layers.3.attn.q_norm": "norms", "layers.3.attn.k_norm": "norms",
    "layers.0.attn.wq": "attention", "layers.0.attn.wk": "attention", "layers.0.attn.wv": "attention",
    "layers.29.attn.wo": "attention",
    "layers.0.attn.bq": "biases", "layers.0.attn.bk": "biases", "layers.0.attn.bv": "biases",
    "layers.0.ffn.w1": "mlp", "layers.0.ffn.w2": "mlp", "layers.7.ffn.w3": "mlp",
    "output": "head",
    "something.else": "other", "layers.0.attn.wx": "other", "outputs": "other", "layers.x.ffn.w1": "other",
}


@pytest.mark.parametrize(("name", "cls"), EXPECTED_CLASS.items())
def test_tensor_class(name, cls):
    assert tensor_class(name) == cls


@pytest.fixture
def sample(tmp_path):
    path, written = write_sample(tmp_path / "m.qbin")
    return path, written


def _run(*args):
    result = CliRunner().invoke(qinfo, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return result.stdout


def _expected_classes(written):
    classes = {}
    for name, t in written.items():
        c = classes.setdefault(tensor_class(name), {"parameters": 0, "bytes": 0, "tensors": 0})
        c["tensors"] += 1
        c["parameters"] += math.prod(t.shape)
        c["bytes"] += sum(np.asarray(a).nbytes for a in t.arrays.values())
    return classes


def test_json_summary(sample):
    path, written = sample
    info = json.loads(_run("--json", path))
    assert list(info) == ["file", "format_version", "file_size", "header_bytes", "tensors", "model", "parameters",
                          "weight_bytes", "bits_per_weight", "file_bits_per_weight", "classes", "sidecars", "tokenizer", "chat_template",
                          "generation", "provenance", "verified_arrays"]
    assert info["file"] == str(path) and info["file_size"] == path.stat().st_size
    assert info["format_version"] == "1.0" and info["tensors"] == len(written) + 1
    assert info["model"]["arch"] == "llama" and info["model"]["rope_scaling"]["kind"] == "llama3"
    expected = _expected_classes(written)
    params = sum(c["parameters"] for c in expected.values())
    nbytes = sum(c["bytes"] for c in expected.values())
    assert info["parameters"] == params and info["weight_bytes"] == nbytes
    assert info["bits_per_weight"] == pytest.approx(8 * nbytes / params, abs=1e-4)
    assert list(info["classes"]) == ["embeddings", "attention", "mlp", "head", "norms"]
    for name, c in info["classes"].items():
        want = expected[name]
        assert (c["tensors"], c["parameters"], c["bytes"]) == (want["tensors"], want["parameters"], want["bytes"])
        assert c["bits_per_weight"] == pytest.approx(8 * want["bytes"] / want["parameters"], abs=1e-4)
    # int4 g32 asym on 48 columns: two groups (32 + 16 padded 16), 4 bits + 2x(16 + 8) bits per row of 48
    assert info["classes"]["embeddings"]["bits_per_weight"] == pytest.approx(4 + 2 * 24 / 48)
    assert info["classes"]["head"]["schemes"] == [
        {"kind": "q8", "group_size": 48, "per_channel": True, "symmetric": True, "tensors": 1}]
    assert info["classes"]["norms"]["schemes"] == [{"kind": "f32", "tensors": 3}]
    mlp = {(s["kind"], s["group_size"], s["symmetric"], s.get("sparsity")) for s in info["classes"]["mlp"]["schemes"]}
    assert mlp == {("q3", 40, False, None), ("q8", 16, False, None), ("q2", 16, False, "2:4")}
    assert info["classes"]["attention"]["sidecars"] == {"outliers": 1, "perm": 1}
    assert info["classes"]["mlp"]["sidecars"] == {"fp_cols": 1, "outliers": 1, "sparse_index": 1}
    assert info["sidecars"] == {"fp_cols": 1, "outliers": 2, "perm": 1, "sparse_index": 1}
    assert info["tokenizer"] == {"kind": "hf-json", "tensor": "tokenizer", "bytes": len(TOKENIZER_BYTES),
                                 "compression": None, "add_bos": True, "selftest_cases": 2}
    assert info["chat_template"] == {"present": True, "chars": len(metadata()["chat_template"])}
    assert info["generation"]["temperature"] == 0.6
    assert info["provenance"]["method"] == "rtn" and info["provenance"]["created"] == "2026-01-01T00:00:00Z"
    assert info["verified_arrays"] is None


def test_text_summary(sample):
    path, written = sample
    out = _run(path)
    info = json.loads(_run("--json", path))
    assert f"{path} (" in out and "qbin 1.0" in out
    assert "llama: 1 layers, dim 48, 4 heads (2 kv, head_dim 12), ffn 64, vocab 64, context 256" in out
    assert "llama3 scaling x8.0" in out and "separate embeddings" in out
    assert f"parameters    {info['parameters']:,}" in out
    assert f"bits/weight   {info['bits_per_weight']:.3f} overall" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "q4 g32 asym" in lines["embeddings"]
    for scheme in ("nf4 g16", "bf16", "f16", "q3 g24 sym"):
        assert scheme in lines["attention"]
    assert "perm (x1)" in lines["attention"] and "outliers (x1)" in lines["attention"]
    assert "q2 g16 asym 2:4" in lines["mlp"] and "sparse_index (x1)" in lines["mlp"]
    assert "q8 per-channel sym" in lines["head"]
    for name, c in info["classes"].items():
        assert f"{c['bits_per_weight']:.3f}" in lines[name]
    assert "sidecars      fp_cols, outliers, perm, sparse_index" in out
    assert f"tokenizer     hf-json (tensor 'tokenizer', {len(TOKENIZER_BYTES)} bytes), add_bos true, 2 selftest" in out
    assert "chat template present" in out
    assert "temperature 0.6" in out and "max_new_tokens 64" in out
    assert "source tiny; converter qconvert 0.1.0; scheme int4-g32; method rtn; created 2026-01-01T00:00:00Z" in out
    assert "command: qconvert tiny -o x.qbin" in out
    assert "checksums" not in out


def test_verify_reports_the_arrays_checked(sample):
    path, written = sample
    n_arrays = sum(len(t.arrays) for t in written.values()) + 1  # + the tokenizer's bytes
    assert f"checksums     {n_arrays} arrays OK" in _run("--verify", path)
    assert json.loads(_run("--verify", "--json", path))["verified_arrays"] == n_arrays


def test_help_says_what_bits_per_weight_counts():
    out = " ".join(_run("--help").split())
    assert "--verify" in out and "--json" in out
    assert "Counted: codes, scales, zeros and every sidecar" in out
    assert "Not counted: alignment padding, the header, and the tokenizer file" in out


def test_minimal_file_without_weights_or_metadata(tmp_path):
    path = tmp_path / "t.qbin"
    with QbinWriter(path) as w:
        w.add_bytes("tokenizer", b"abc")
        w.finish(model=model_args(tie_embeddings=True, rope_scaling=None))
    out = _run(path)
    assert "bits/weight   - overall" in out and "no scaling" in out and "tied embeddings" in out
    assert "tokenizer     none" in out and "chat template absent" in out
    assert "generation    no defaults" in out and "sidecars      none" in out
    info = json.loads(_run("--json", path))
    assert info["parameters"] == 0 and info["bits_per_weight"] is None and info["classes"] == {}


def test_per_channel_int8_bits(tmp_path):
    """int8 per channel on 64 columns: 8 bits + one f16 scale per 64 weights = 8.25."""
    path = tmp_path / "h.qbin"
    with QbinWriter(path) as w:
        w.add_tensor(parse_scheme("int8").quantize("output", np.ones((10, 64), np.float32)))
        w.finish(model=model_args())
    assert json.loads(_run("--json", path))["classes"]["head"]["bits_per_weight"] == 8.25


@pytest.mark.parametrize(("arch", "tied"), [("qwen2", False), ("qwen3", True)])
def test_converted_model_has_every_tensor_classified(tiny_checkpoint, tmp_path, arch, tied):
    """The converter's names (the contract of spec §3.1) all fall into a known class."""
    from qformat.convert import convert

    out = tmp_path / "m.qbin"
    report = convert(tiny_checkpoint(arch, tied, "float32", False, "hf-json"), out, "int4-g32", progress=False)
    info = json.loads(_run("--json", "--verify", out))
    n_layers = info["model"]["n_layers"]
    classes = info["classes"]
    assert "other" not in classes
    assert classes["attention"]["tensors"] == 4 * n_layers and classes["mlp"]["tensors"] == 3 * n_layers
    assert ("biases" in classes) == (arch == "qwen2") and ("head" in classes) == (not tied)
    assert classes["norms"]["tensors"] == (4 if arch == "qwen3" else 2) * n_layers + 1
    assert info["parameters"] == report.n_params
    assert info["bits_per_weight"] == pytest.approx(report.bpw, abs=1e-3)
    assert info["provenance"]["scheme"] == "int4-g32" and info["tokenizer"]["kind"] == "hf-json"


def test_tensors_lists_every_tensor_with_its_scheme_and_bits(sample):
    path, written = sample
    out = _run("--tensors", path)
    info = json.loads(_run("--json", "--tensors", path))
    rows = {t["name"]: t for t in info["per_tensor"]}
    assert set(rows) == set(written) - {"tokenizer"}
    for name, t in written.items():
        if name == "tokenizer":
            continue
        nbytes = sum(np.asarray(a).nbytes for a in t.arrays.values())
        assert rows[name]["bits_per_weight"] == pytest.approx(8 * nbytes / math.prod(t.shape), abs=1e-4)
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert f"{rows[name]['bits_per_weight']:.3f}" in line and line.split()[2] == rows[name]["kind"]
    assert info["file_bits_per_weight"] == pytest.approx(8 * info["file_size"] / info["parameters"], abs=1e-4)
    assert "per_tensor" not in json.loads(_run("--json", path))
