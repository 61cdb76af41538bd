"""Conversions of tiny random HF checkpoints, checked against an independent NumPy reference.

The reference below is written from the scheme's definition and spec/qbin.md's bit layout,
not by calling qformat.schemes / qformat.packing, so a wrong layout, scale or zero-point in the
library fails these tests.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qformat import QbinReader
from qformat.convert import convert

# QLoRA's NormalFloat4 levels (bitsandbytes' table), in code order.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# scheme name -> (stored kind, bits, group size or None for per channel, symmetric)
SCHEMES = {
    "int8": ("q8", 8, None, True),
    "int8-g128": ("q8", 8, 128, True),
    "int4-g128": ("q4", 4, 128, False),
    "int4-g64": ("q4", 4, 64, False),
    "int4-g32": ("q4", 4, 32, False),
    "int4-g64-sym": ("q4", 4, 64, True),
    "int3-g128": ("q3", 3, 128, False),
    "int2-g64": ("q2", 2, 64, False),
    "int2-g64-sym": ("q2", 2, 64, True),
    "nf4-g64": ("nf4", 4, 64, True),
}


# ---------------------------------------------------------------------------- reference

def unpack_reference(packed: np.ndarray, k: int, group: int, bits: int) -> np.ndarray:
    """Spec layout: each group padded to a multiple of 8 codes (P); for b in 2,4,8 byte j of the
    group holds code i*S+j in bits [i*b, (i+1)*b) with S = P*b/8; 3-bit = 2-bit plane of the low
    bits, then a 1-bit plane of the high bit."""
    def planes(b: np.ndarray, width: int) -> np.ndarray:
        return np.concatenate([(b >> (i * width)) & ((1 << width) - 1) for i in range(8 // width)], axis=1)

    out = np.zeros((packed.shape[0], k), np.uint8)
    pos = 0
    for start in range(0, k, group):
        length = min(group, k - start)
        p = -(-length // 8) * 8
        if bits == 3:
            q = planes(packed[:, pos:pos + p // 4], 2) | (planes(packed[:, pos + p // 4:pos + 3 * p // 8], 1) << 2)
        else:
            q = planes(packed[:, pos:pos + p * bits // 8], bits)
        out[:, start:start + length] = q[:, :length]
        pos += p * bits // 8
    assert pos == packed.shape[1], "row bytes disagree with the spec"
    return out


def f16_scale(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(2.0 ** -24)).astype(np.float16).astype(np.float32)


def rtn_reference(w: np.ndarray, bits: int, group: int, symmetric: bool, nf4: bool):
    """Plain min/max RTN: (scales, zeros or None, codes), group by group."""
    rows, k = w.shape
    qmax = (1 << bits) - 1
    scales, zeros, codes = [], [], []
    for start in range(0, k, group):
        x = w[:, start:start + group]
        if nf4:
            s = f16_scale(np.abs(x).max(axis=1))
            q = np.abs((x / s[:, None])[..., None] - NF4).argmin(axis=-1)
            z = None
        elif symmetric:
            s = f16_scale(2.0 * np.abs(x).max(axis=1) / qmax)
            z = np.full(rows, 1 << (bits - 1), np.float32)
            q = np.clip(np.round(x / s[:, None]) + z[:, None], 0, qmax)
        else:
            lo, hi = np.minimum(x.min(axis=1), 0.0), np.maximum(x.max(axis=1), 0.0)
            s = f16_scale((hi - lo) / qmax)
            z = np.clip(np.round(-lo / s), 0, qmax)
            q = np.clip(np.round(x / s[:, None]) + z[:, None], 0, qmax)
        scales.append(s)
        zeros.append(z)
        codes.append(q.astype(np.uint8))
    return (np.stack(scales, 1), None if zeros[0] is None else np.stack(zeros, 1), np.concatenate(codes, 1))


def hf_name(qbin_name: str) -> str:
    """qbin tensor name -> HF name (the contract in the common brief, written out again here)."""
    table = [
        (r"^tok_embeddings$", "model.embed_tokens.weight"), (r"^output$", "lm_head.weight"),
        (r"^norm$", "model.norm.weight"),
        (r"^layers\.(\d+)\.attn_norm$", r"model.layers.\1.input_layernorm.weight"),
        (r"^layers\.(\d+)\.ffn_norm$", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"^layers\.(\d+)\.attn\.w([qkvo])$", r"model.layers.\1.self_attn.\2_proj.weight"),
        (r"^layers\.(\d+)\.attn\.b([qkv])$", r"model.layers.\1.self_attn.\2_proj.bias"),
        (r"^layers\.(\d+)\.attn\.([qk]_norm)$", r"model.layers.\1.self_attn.\2.weight"),
        (r"^layers\.(\d+)\.ffn\.w1$", r"model.layers.\1.mlp.gate_proj.weight"),
        (r"^layers\.(\d+)\.ffn\.w3$", r"model.layers.\1.mlp.up_proj.weight"),
        (r"^layers\.(\d+)\.ffn\.w2$", r"model.layers.\1.mlp.down_proj.weight"),
    ]
    for pattern, repl in table:
        if re.match(pattern, qbin_name):
            return re.sub(pattern, repl, qbin_name)
    raise KeyError(qbin_name)


def hf_weights(folder) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


def check_quantized(t, w: np.ndarray, scheme: str, clip_search: bool) -> None:
    kind, bits, group, symmetric = SCHEMES[scheme]
    rows, k = w.shape
    group = group or k
    assert (t.kind, t.group_size, t.symmetric) == (kind, group, symmetric)
    s = t.arrays["scales"].astype(np.float32)
    q = unpack_reference(t.arrays["codes"], k, group, bits)
    assert q.max() < (1 << bits)
    s_full = np.repeat(s, group, axis=1)[:, :k]
    if kind == "nf4":
        deq = NF4[q] * s_full
        z = None
    else:
        z = t.arrays["zeros"].astype(np.float32) if "zeros" in t.arrays else np.full(s.shape, 1 << (bits - 1), np.float32)
        deq = (q.astype(np.float32) - np.repeat(z, group, axis=1)[:, :k]) * s_full
    np.testing.assert_array_equal(deq, t.dequantize())  # the library's reference agrees with the spec

    ref_s, ref_z, ref_q = rtn_reference(w, bits, group, symmetric, kind == "nf4")
    if not clip_search:
        np.testing.assert_array_equal(s, ref_s)
        if ref_z is not None and not symmetric:
            np.testing.assert_array_equal(z, ref_z)
        np.testing.assert_array_equal(q, ref_q)
        return
    # Clip search only shrinks the range (ratios 1.0 .. 0.5) ...
    assert np.all(s <= ref_s * 1.002) and np.all(s >= ref_s * 0.45)
    # ... codes are still round-to-nearest under the stored scale and zero-point ...
    if kind == "nf4":
        want = np.abs((w / s_full)[..., None] - NF4).argmin(axis=-1)
    else:
        zf = np.repeat(z, group, axis=1)[:, :k]
        want = np.clip(np.round(w / s_full) + zf, 0, (1 << bits) - 1)
    assert np.mean(q == want) > 0.9999
    # ... and no group ends up worse than plain min/max.
    plain = ((NF4[ref_q] if kind == "nf4" else ref_q.astype(np.float32) - np.repeat(ref_z, group, axis=1)[:, :k])
             * np.repeat(ref_s, group, axis=1)[:, :k])
    for start in range(0, k, group):
        sl = slice(start, start + group)
        err = ((deq[:, sl] - w[:, sl]) ** 2).sum(axis=1)
        err_plain = ((plain[:, sl] - w[:, sl]) ** 2).sum(axis=1)
        assert np.all(err <= err_plain * (1 + 1e-5) + 1e-12)


def check_file(folder, path, scheme: str, *, clip_search: bool = True, head_scheme: str | None = None,
               embed_scheme: str | None = None) -> QbinReader:
    """Every tensor of the qbin against the HF weights and the reference of its scheme."""
    r = QbinReader(path, verify=True)
    weights = hf_weights(folder)
    config = json.loads((folder / "config.json").read_text())
    tied_in_file = "output" not in r
    assert r.model.tie_embeddings == tied_in_file
    expected_names = {n for n in (_qbin_names(weights)) if not (n == "output" and tied_in_file)}
    if config.get("tie_word_embeddings") and not tied_in_file:
        expected_names.add("output")  # a split tied head, stored from the embeddings
    assert set(r.names()) == expected_names | {"tokenizer"}
    for name in r.names():
        if name == "tokenizer":
            continue
        t = r[name]
        w = weights.get(hf_name(name), weights["model.embed_tokens.weight"] if name == "output" else None)
        target = {"tok_embeddings": embed_scheme, "output": head_scheme}.get(name) or scheme
        if w.ndim == 1:
            assert t.kind == "f32"
            np.testing.assert_array_equal(t.arrays["data"], w)
        elif target == "f16":
            assert t.kind == "f16"
            np.testing.assert_array_equal(t.arrays["data"], w.astype(np.float16))
        elif target == "bf16":
            assert t.kind == "bf16"
            bits = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            np.testing.assert_array_equal(t.arrays["data"], bits)
        else:
            check_quantized(t, w, target, clip_search)
    tok_file = folder / ("tokenizer.json" if r.tokenizer.kind == "hf-json" else "tokenizer.model")
    assert r["tokenizer"].kind == "xz" and r.raw_bytes("tokenizer") == tok_file.read_bytes()
    return r


def _qbin_names(weights: dict) -> set[str]:
    out = set()
    for hf in weights:
        for name in ("tok_embeddings", "output", "norm"):
            if hf_name(name) == hf:
                out.add(name)
        m = re.match(r"model\.layers\.(\d+)\.(.*)$", hf)
        if m:
            rest = {
                "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
                "mlp.gate_proj.weight": "ffn.w1", "mlp.up_proj.weight": "ffn.w3", "mlp.down_proj.weight": "ffn.w2",
                "self_attn.q_norm.weight": "attn.q_norm", "self_attn.k_norm.weight": "attn.k_norm",
            }.get(m[2])
            if rest is None:
                pm = re.match(r"self_attn\.([qkvo])_proj\.(weight|bias)$", m[2])
                rest = f"attn.{'w' if pm[2] == 'weight' else 'b'}{pm[1]}"
            out.add(f"layers.{m[1]}.{rest}")
    return out


# ---------------------------------------------------------------------------- tests

# A covering subset of arch x tied x sharded x dtype x tokenizer x scheme.
CASES = [
    # arch, tied, dtype, sharded, tokenizer, schemes
    ("llama", True, "float32", False, "sentencepiece", ["f16", "int4-g64", "int3-g128", "nf4-g64"]),
    ("llama", False, "bfloat16", True, "hf-json", ["bf16", "int8", "int4-g32", "int2-g64"]),
    ("mistral", True, "bfloat16", True, "hf-json", ["int4-g128", "int8-g128"]),
    ("qwen2", False, "bfloat16", False, "hf-json", ["int4-g64", "nf4-g64"]),
    ("qwen2", True, "float16", True, "sentencepiece", ["int4-g64-sym"]),
    ("qwen3", False, "float32", True, "sentencepiece", ["int3-g128", "int4-g64"]),
    ("qwen3", True, "bfloat16", False, "hf-json", ["int8", "int2-g64"]),
]


@pytest.mark.parametrize("arch,tied,dtype,sharded,tokenizer,schemes", CASES,
                         ids=[f"{c[0]}-{'tied' if c[1] else 'untied'}-{c[2]}-{'sharded' if c[3] else 'single'}-{c[4]}"
                              for c in CASES])
def test_convert_matches_reference(tiny_checkpoint, tmp_path, arch, tied, dtype, sharded, tokenizer, schemes):
    folder = tiny_checkpoint(arch, tied, dtype, sharded, tokenizer)
    for scheme in schemes:
        out = tmp_path / f"{scheme}.qbin"
        report = convert(folder, out, scheme, progress=False)
        special = "int8" if SCHEMES.get(scheme, ("", 16))[1] < 8 else scheme
        r = check_file(folder, out, scheme, head_scheme=special, embed_scheme=special)
        assert r.model.arch == arch and r.provenance.scheme == scheme
        assert report.file_size == out.stat().st_size
        assert report.n_params == sum(np.prod(r[n].shape) for n in r.names() if n != "tokenizer")


@pytest.mark.parametrize("scheme", ["int4-g64", "int8", "nf4-g64", "int3-g128", "int2-g64-sym"])
def test_plain_min_max_equals_reference_exactly(tiny_checkpoint, tmp_path, scheme):
    folder = tiny_checkpoint("qwen2", False, "float32", False, "hf-json")
    out = tmp_path / "m.qbin"
    report = convert(folder, out, scheme, clip_search=False, progress=False, head="scheme", embed="scheme")
    check_file(folder, out, scheme, clip_search=False)
    lin = [t.stats for t in report.tensors if t.role == "linear"]
    assert all(s.sq_err == pytest.approx(s.sq_err_minmax, rel=1e-5) for s in lin)


def test_clip_search_lowers_error(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("llama", True, "float32", False, "hf-json")
    report = convert(folder, tmp_path / "a.qbin", "int3-g128", progress=False, clip_search=True)
    plain, searched = report.rel_mse(minmax=True), report.rel_mse()
    assert searched < plain * 0.97
    # The min/max error the search reports is the one a plain conversion really has.
    plain_report = convert(folder, tmp_path / "b.qbin", "int3-g128", clip_search=False, progress=False)
    assert plain_report.rel_mse() == pytest.approx(plain, rel=1e-4)


def test_head_and_embed_options(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("qwen3", True, "bfloat16", False, "hf-json")
    out = tmp_path / "split.qbin"
    convert(folder, out, "int4-g64", head="f16", embed="int8", progress=False)
    r = check_file(folder, out, "int4-g64", head_scheme="f16", embed_scheme="int8")
    assert "output" in r and not r.model.tie_embeddings  # tied in HF, split in the qbin
    out2 = tmp_path / "same.qbin"
    convert(folder, out2, "int4-g64", head="scheme", embed="scheme", skip=["layers.1.*"], progress=False)
    r2 = QbinReader(out2)
    assert "output" not in r2 and r2.model.tie_embeddings
    assert r2["tok_embeddings"].kind == "q4" and r2["layers.1.attn.wq"].kind == "f16"
    assert r2["layers.0.attn.wq"].kind == "q4" and r2["layers.1.attn_norm"].kind == "f32"


def test_header_metadata(tiny_checkpoint, tmp_path):
    import sentencepiece as spm
    from tiny_models import CHAT_TEMPLATE
    from tokenizers import Tokenizer
    from transformers import AutoConfig

    for folder in (tiny_checkpoint("qwen3", True, "bfloat16", False, "hf-json"),
                   tiny_checkpoint("llama", True, "float32", False, "sentencepiece")):
        out = tmp_path / f"{folder.name}.qbin"
        convert(folder, out, "int4-g64", progress=False)
        r = QbinReader(out)
        cfg = AutoConfig.from_pretrained(folder)
        m = r.model
        assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size) == (
            cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size)
        assert m.head_dim == getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        assert m.rope_theta == cfg.rope_parameters["rope_theta"] and m.norm_eps == cfg.rms_norm_eps
        assert m.eos_token_ids == [cfg.eos_token_id] and m.bos_token_id == cfg.bos_token_id
        assert r.chat_template == CHAT_TEMPLATE
        assert r.provenance.method == "rtn" and r.provenance.created.endswith("Z")
        assert set(r.provenance.source_files) >= {"config.json", "tokenizer_config.json"}
        data = (folder / ("tokenizer.json" if r.tokenizer.kind == "hf-json" else "tokenizer.model")).read_bytes()
        assert len(r.tokenizer.selftest) >= 6
        for case in r.tokenizer.selftest:
            if r.tokenizer.kind == "hf-json":
                ids = Tokenizer.from_str(data.decode()).encode(case.text, add_special_tokens=False).ids
            else:
                ids = spm.SentencePieceProcessor(model_proto=data).encode(case.text)
            assert case.ids == ids and len(ids) > 0
    assert r.tokenizer.kind == "sentencepiece" and r.tokenizer.add_bos


def test_rope_scaling_and_generation_config(tiny_checkpoint, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("llama", False, "bfloat16", True, "hf-json"), src)
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters", None)  # transformers 4 style
    config.update(rope_theta=500000.0, eos_token_id=[2, 0], rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128})
    (src / "config.json").write_text(json.dumps(config))
    (src / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 1], "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    convert(src, tmp_path / "o.qbin", "int8", progress=False)
    r = QbinReader(tmp_path / "o.qbin")
    assert r.model.rope_theta == 500000.0 and r.model.eos_token_ids == [2, 0, 1]
    rs = r.model.rope_scaling
    assert (rs.kind, rs.factor, rs.high_freq_factor, rs.original_max_position) == ("llama3", 8.0, 4.0, 128)
    assert (r.generation.temperature, r.generation.top_p, r.generation.top_k) == (0.6, 0.9, None)


def test_pickle_checkpoint_with_explicit_flag(tiny_checkpoint, tmp_path):
    import shutil

    src = tmp_path / "bin"
    shutil.copytree(tiny_checkpoint("llama", True, "float32", False, "hf-json"), src)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    convert(src, tmp_path / "o.qbin", "int4-g64", allow_pickle=True, progress=False)
    ref = tmp_path / "ref.qbin"
    convert(tiny_checkpoint("llama", True, "float32", False, "hf-json"), ref, "int4-g64", progress=False)
    a, b = QbinReader(tmp_path / "o.qbin"), QbinReader(ref)
    for name in b.names():
        for role, arr in b[name].arrays.items():
            np.testing.assert_array_equal(a[name].arrays[role], arr)


def test_deterministic_bytes(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    folder = tiny_checkpoint("mistral", True, "bfloat16", True, "hf-json")
    for name in ("a.qbin", "b.qbin"):
        convert(folder, tmp_path / name, "nf4-g64", progress=False, command="qconvert x")
    assert (tmp_path / "a.qbin").read_bytes() == (tmp_path / "b.qbin").read_bytes()
    assert QbinReader(tmp_path / "a.qbin").provenance.created == "2023-11-14T22:13:20Z"


def test_dry_run_size_estimate(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("qwen2", False, "bfloat16", False, "hf-json")
    dry = convert(folder, tmp_path / "x.qbin", "int4-g128", dry_run=True)
    assert not (tmp_path / "x.qbin").exists()
    real = convert(folder, tmp_path / "x.qbin", "int4-g128", progress=False)
    assert [(t.name, t.scheme, t.nbytes) for t in dry.tensors] == [(t.name, t.scheme, t.nbytes) for t in real.tensors]
    assert abs(dry.file_size - real.file_size) < 0.1 * real.file_size


@pytest.mark.parametrize("options", [dict(prune="2:4", prune_method="magnitude"),
                                     dict(prune="4:8", prune_method="magnitude"), dict(outliers="1%"),
                                     dict(method="gptq", calib_samples=2, calib_seqlen=16, static_groups=False)],
                         ids=["2:4", "4:8", "outliers", "gptq-act-order-perm"])
def test_dry_run_size_estimate_with_sidecars(tiny_checkpoint, tmp_path, options):
    """The dry run sizes compressed n:m codes and positions, outlier CSR arrays and act-order
    permutations exactly as the conversion writes them."""
    folder = tiny_checkpoint("llama", True, "float32", False, "hf-json")
    dry = convert(folder, tmp_path / "x.qbin", "int4-g32", dry_run=True, **options)
    real = convert(folder, tmp_path / "x.qbin", "int4-g32", progress=False, **options)
    dense = convert(folder, tmp_path / "x.qbin", "int4-g32", dry_run=True)
    assert [(t.name, t.nbytes) for t in dry.tensors] == [(t.name, t.nbytes) for t in real.tensors]
    assert dry.linear_bpw == pytest.approx(real.linear_bpw)
    assert (dry.linear_bpw < dense.linear_bpw) == ("prune" in options and options["prune"] == "2:4")
