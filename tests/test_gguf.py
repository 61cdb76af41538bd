"""GGUF import and export (convert/gguf_import.py, gguf_export.py).

Import: a tiny Llama written as GGUF by gguf-py, as llama.cpp's converter writes one (q/k rows
permuted, BPE vocabulary in the metadata), checked tensor by tensor against gguf-py's own
dequantization, its tokenizer against the checkpoint's tokenizer.json, and its logits against
transformers running the same dequantized weights. Export: the round trips GGUF -> qbin -> GGUF
and qbin -> GGUF -> qbin are bit-exact for the types that map, and what does not map is refused
or requantized with the error reported."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from tiny_models import make_tiny_checkpoint, training_text  # noqa: E402

import qformat  # noqa: E402
from qformat.convert import ConvertError, convert, export_gguf, import_gguf  # noqa: E402
from qformat.convert.cli import main as qconvert  # noqa: E402
from qformat.convert.gguf_import import unpermute_rows  # noqa: E402
from qformat.reader import QbinReader  # noqa: E402

Q = gguf.GGMLQuantizationType
# HF name part -> (GGUF name part, GGUF type): every exact type, and the embedding in Q8_0 as
# llama.cpp's Q4_1 files store it
TYPES = {"embed_tokens": ("token_embd", Q.Q8_0), "q_proj": ("attn_q", Q.Q4_1), "k_proj": ("attn_k", Q.Q4_0),
         "v_proj": ("attn_v", Q.Q8_0), "o_proj": ("attn_output", Q.F16), "gate_proj": ("ffn_gate", Q.Q4_1),
         "up_proj": ("ffn_up", Q.Q4_1), "down_proj": ("ffn_down", Q.BF16), "lm_head": ("output", Q.Q4_0)}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama q/k rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype) -> np.ndarray:
    if qtype == Q.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def write_gguf(folder, path, types=TYPES, arch="llama", drop_key=None):
    """The checkpoint in `folder` as llama.cpp's converter writes it; returns {gguf name: the
    weights gguf-py dequantizes it to, in HF row order}."""
    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else None
    state = load_file(folder / "model.safetensors")
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": lambda: w.add_block_count(config["num_hidden_layers"]),
        "context_length": lambda: w.add_context_length(config["max_position_embeddings"]),
        "embedding_length": lambda: w.add_embedding_length(config["hidden_size"]),
        "feed_forward_length": lambda: w.add_feed_forward_length(config["intermediate_size"]),
    }
    for name, add in keys.items():
        if name != drop_key:
            add()
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if tok is None:  # SentencePiece, as llama.cpp's converter writes it: pieces, scores, types
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        n = sp.get_piece_size()
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)] + [f"[PAD{i}]" for i in range(n, config["vocab_size"])])
        w.add_token_scores([sp.get_score(i) for i in range(n)] + [0.0] * (config["vocab_size"] - n))
        w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                           for i in range(n)] + [5] * (config["vocab_size"] - n))
    else:
        vocab = tok["model"]["vocab"]
        tokens = [None] * config["vocab_size"]
        for t, i in vocab.items():
            tokens[i] = t
        special = {a["id"] for a in tok["added_tokens"] if a["special"]}
        types_ = [3 if i in special else 1 if t is not None else 5 for i, t in enumerate(tokens)]
        tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types_)
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"] if isinstance(config["eos_token_id"], int) else config["eos_token_id"][0])
    w.add_add_bos_token(tok is None)
    w.add_chat_template("{{ messages }}")
    expected = {}
    for hf, value in state.items():
        value = value.astype(np.float32)
        parts = hf.split(".")
        if hf == "model.norm.weight":
            name, qtype = "output_norm.weight", Q.F32
        elif parts[-2] in NORMS:
            name, qtype = f"blk.{parts[2]}.{NORMS[parts[-2]]}.weight", Q.F32
        else:
            key = parts[-2] if hf != "lm_head.weight" else "lm_head"
            base, qtype = types[key]
            name = f"blk.{parts[2]}.{base}.weight" if hf.startswith("model.layers.") else f"{base}.weight"
            if key in ("q_proj", "k_proj"):
                value = permute(value, n_heads if key == "q_proj" else n_kv)
        data = encode(value, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        back = gguf.quants.dequantize(data, qtype) if data.dtype == np.uint8 else data.astype(np.float32)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            back = back[unpermute_rows(back.shape[0], n_heads if "attn_q" in name else n_kv)]
        expected[name] = back.reshape(value.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), tied=False, seed=4,
                                  config_overrides={"hidden_size": 64, "intermediate_size": 128})
    path = folder.parent / "tiny.gguf"
    return folder, path, write_gguf(folder, path)


def test_every_exact_type_imports_bit_for_bit(tiny, tmp_path):
    folder, path, expected = tiny
    report = import_gguf(path, tmp_path / "m.qbin")
    assert "requantized" not in report.notes[-1]
    r = QbinReader(tmp_path / "m.qbin", verify=True)
    names = {"token_embd.weight": "tok_embeddings", "output.weight": "output", "output_norm.weight": "norm"}
    parts = {"attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv", "attn_output": "attn.wo",
             "ffn_gate": "ffn.w1", "ffn_up": "ffn.w3", "ffn_down": "ffn.w2", "attn_norm": "attn_norm",
             "ffn_norm": "ffn_norm"}
    kinds = set()
    for gname, want in expected.items():
        if gname in names:
            name = names[gname]
        else:
            _, layer, part, _ = gname.split(".")
            name = f"layers.{layer}.{parts[part]}"
        t = r[name]
        kinds.add((t.kind, "offsets" in t.arrays))
        np.testing.assert_array_equal(t.dequantize(), want, err_msg=name)
    assert kinds == {("q8", False), ("q4", True), ("q4", False), ("f16", False), ("bf16", False), ("f32", False)}
    assert r.provenance.method.startswith("gguf import: exact")


def test_imported_tokenizer_encodes_as_the_checkpoints(tiny, tmp_path):
    from tokenizers import Tokenizer

    folder, path, _ = tiny
    import_gguf(path, tmp_path / "m.qbin")
    m = qformat.load(tmp_path / "m.qbin")
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = list(training_text(1)) + ["<|im_start|>user\nHi there<|im_end|>\n", "  spaces\tand\n\nnewlines  ", "Grüße 東京 🙂"]
    for text in texts:
        assert m.tokenizer.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False).ids, text
    assert m.chat_template == "{{ messages }}"


def test_imported_logits_match_transformers_on_the_same_weights(tiny, tmp_path):
    """The q/k permutation undone, every kind run by the CPU kernels: logits as transformers'."""
    folder, path, expected = tiny
    import_gguf(path, tmp_path / "m.qbin")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_names = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}
    parts = {v[0]: k for k, v in TYPES.items()} | {v: k for k, v in NORMS.items()}
    with torch.no_grad():
        params = dict(model.named_parameters())
        for gname, w in expected.items():
            bits = gname.split(".")
            if bits[0] == "blk":
                sub = "self_attn" if parts[bits[2]] in ("q_proj", "k_proj", "v_proj", "o_proj") else \
                      "mlp" if parts[bits[2]].endswith("proj") else None
                hf = f"model.layers.{bits[1]}." + (f"{sub}." if sub else "") + f"{parts[bits[2]]}.weight"
            else:
                hf = hf_names[bits[0]] + ".weight"
            params[hf].copy_(torch.from_numpy(w))
    ids = [int(i) for i in np.random.default_rng(3).integers(5, 300, 24)]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = qformat.load(tmp_path / "m.qbin").logits(ids)
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()


def test_types_without_a_layout_need_a_scheme(tiny, tmp_path):
    folder, _, _ = tiny
    path = tmp_path / "q5.gguf"
    write_gguf(folder, path, types={**TYPES, "up_proj": ("ffn_up", Q.Q5_0)})
    with pytest.raises(ConvertError, match=r"blk\.0\.ffn_up\.weight is Q5_0.*--scheme"):
        import_gguf(path, tmp_path / "m.qbin")
    assert not (tmp_path / "m.qbin").exists()
    report = import_gguf(path, tmp_path / "m.qbin", "int8")
    assert "requantized to int8: Q5_0 x2" in report.notes[-1]
    assert QbinReader(tmp_path / "m.qbin")["layers.1.ffn.w3"].kind == "q8"


@pytest.mark.parametrize("case, match", [
    ("truncated", r"not a readable GGUF file"),
    ("not_gguf", r"not a GGUF file"),
    ("arch", r"architecture 'gpt2' is not supported"),
    ("missing_key", r"'llama\.block_count' is missing"),
])
def test_bad_gguf_is_one_clear_error_and_writes_nothing(tiny, tmp_path, case, match):
    folder, path, _ = tiny
    bad = tmp_path / "bad.gguf"
    if case == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif case == "not_gguf":
        bad = tmp_path / "bad.bin"
        bad.write_bytes(b"GGML" + path.read_bytes()[4:])
    elif case == "arch":
        write_gguf(folder, bad, arch="gpt2")
    else:
        write_gguf(folder, bad, drop_key="block_count")
    dst = tmp_path / "out.qbin"
    with pytest.raises(ConvertError, match=match):
        import_gguf(bad, dst)
    assert not dst.exists() and not list(tmp_path.glob("*.tmp"))


def test_cli_imports_a_gguf_and_refuses_float_only_options(tiny, tmp_path):
    _, path, _ = tiny
    res = CliRunner().invoke(qconvert, [str(path), str(tmp_path / "m.qbin")])
    assert res.exit_code == 0, res.output
    assert "exact BF16 x2, F16 x2, F32 x5, Q4_0 x3, Q4_1 x6, Q8_0 x3" in res.output and (tmp_path / "m.qbin").is_file()
    res = CliRunner().invoke(qconvert, [str(path), str(tmp_path / "n.qbin"), "--method", "gptq"])
    assert res.exit_code == 2 and "--method needs the Hugging Face checkpoint" in res.output
    res = CliRunner().invoke(qconvert, [str(tmp_path / "m.qbin"), str(tmp_path / "n.qbin"), "-s", "int4"])
    assert res.exit_code == 2  # a qbin is not a model folder


# ---------------------------------------------------------------------------- export


def test_gguf_qbin_gguf_round_trip_is_byte_identical(tiny, tmp_path):
    _, path, _ = tiny
    import_gguf(path, tmp_path / "m.qbin")
    report = export_gguf(tmp_path / "m.qbin", tmp_path / "back.gguf")
    assert not report.notes and not report.minimum_error
    a, b = gguf.GGUFReader(path), gguf.GGUFReader(tmp_path / "back.gguf")
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type, name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(tb[name].data), err_msg=name)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "llama.block_count", "llama.attention.head_count_kv"):
        assert a.fields[key].contents() == b.fields[key].contents(), key


@pytest.mark.parametrize("scheme", ["int4-g32-sym", "int8-g32", "f16"])
def test_qbin_gguf_qbin_round_trip_is_bit_exact(tiny, tmp_path, scheme):
    folder, _, _ = tiny
    src, back = tmp_path / "src.qbin", tmp_path / "back.qbin"
    convert(folder, src, scheme, head="scheme", embed="scheme", clip_search=False, progress=False)
    export_gguf(src, tmp_path / "m.gguf")
    import_gguf(tmp_path / "m.gguf", back)
    a, b = QbinReader(src), QbinReader(back)
    assert set(a.names()) == set(b.names())
    for name in a.names():
        ta, tb = a[name], b[name]
        if ta.kind == "xz":
            continue
        assert (ta.kind, ta.shape, ta.group_size, ta.symmetric) == (tb.kind, tb.shape, tb.group_size, tb.symmetric)
        for role, arr in ta.arrays.items():
            np.testing.assert_array_equal(arr, tb.arrays[role], err_msg=f"{name}.{role}")
    ids = [5, 17, 42, 8, 99, 3]
    np.testing.assert_array_equal(qformat.load(src).logits(ids), qformat.load(back).logits(ids))


def test_zero_points_become_q4_1_minima_with_the_error_reported(tiny, tmp_path):
    folder, _, _ = tiny
    src = tmp_path / "src.qbin"
    convert(folder, src, "int4-g32", head="scheme", embed="scheme", clip_search=False, progress=False)
    report = export_gguf(src, tmp_path / "m.gguf")
    assert set(report.types.values()) == {"Q4_1", "F32"}
    assert report.minimum_error and "stored as Q4_1's float16 minimum" in report.summary()
    import_gguf(tmp_path / "m.gguf", tmp_path / "back.qbin")
    a, b = QbinReader(src), QbinReader(tmp_path / "back.qbin")
    w, got = a["layers.0.ffn.w2"].dequantize(), b["layers.0.ffn.w2"].dequantize()
    assert 0 < np.abs(got - w).max() <= 1e-3 * np.abs(w).max()


def test_tensors_gguf_cannot_hold_are_refused_or_requantized(tiny, tmp_path):
    folder, _, _ = tiny
    src = tmp_path / "g64.qbin"
    convert(folder, src, "int4-g64", clip_search=False, progress=False)
    with pytest.raises(ConvertError, match=r"\d+ tensor\(s\) have no GGUF type: tok_embeddings is q8 in groups of 64.*--requantize"):
        export_gguf(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".*.tmp"))
    report = export_gguf(src, tmp_path / "m.gguf", "Q8_0")
    assert "Q8_0" in report.types.values()
    assert any("requantized to Q8_0 (relative RMS error" in n for n in report.notes)
    with pytest.raises(ConvertError, match=r"not a GGUF type"):
        export_gguf(src, tmp_path / "n.gguf", "Q9_9")


def test_cli_export(tiny, tmp_path):
    _, path, _ = tiny
    import_gguf(path, tmp_path / "m.qbin")
    res = CliRunner().invoke(qconvert, ["export", str(tmp_path / "m.qbin"), "--to", "gguf", str(tmp_path / "o.gguf")])
    assert res.exit_code == 0, res.output
    assert "Q4_1 x6" in res.output and (tmp_path / "o.gguf").is_file()
    res = CliRunner().invoke(qconvert, ["export", str(tmp_path / "m.qbin"), "--to", "gguf", str(tmp_path / "o.gguf")])
    assert res.exit_code == 2 and "already exists" in res.output


def test_corrupted_gguf_is_a_convert_error_or_imports(tiny, tmp_path):
    """Bytes of the header, metadata and tensor directory overwritten at random, and cuts at
    random places: the import either succeeds or raises ConvertError, never another exception,
    and leaves nothing behind when it fails. FUZZ_CASES and FUZZ_SEED run a longer campaign."""
    _, path, _ = tiny
    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    directory_end = int(reader.data_offset)
    rng = np.random.default_rng(int(os.environ.get("FUZZ_SEED", 11)))
    outcomes = {"ok": 0, "refused": 0}
    for i in range(int(os.environ.get("FUZZ_CASES", 60))):
        bad = bytearray(data)
        if i % 4 == 3:
            bad = bad[: int(rng.integers(8, len(data)))]
        else:
            for at in rng.integers(4, directory_end, int(rng.integers(1, 4))):
                bad[at] = int(rng.integers(0, 256))
        src, dst = tmp_path / f"c{i}.gguf", tmp_path / f"c{i}.qbin"
        src.write_bytes(bytes(bad))
        try:
            import_gguf(src, dst)
            outcomes["ok"] += 1
        except ConvertError:
            outcomes["refused"] += 1
            assert not dst.exists()
        src.unlink()
        dst.unlink(missing_ok=True)
    assert outcomes["refused"] > 0 and not list(tmp_path.glob("*.tmp"))


def test_sentencepiece_gguf_tokenizer_encodes_as_the_model(tmp_path):
    """A SentencePiece vocabulary (tokenizer.ggml.model "llama": pieces, scores, byte tokens),
    rebuilt by transformers' GGUF builder, encodes as the SentencePiece model it came from."""
    import sentencepiece

    folder = make_tiny_checkpoint(tmp_path / "sp", tokenizer="sentencepiece", tied=True, seed=2,
                                  config_overrides={"hidden_size": 64, "intermediate_size": 128})
    path = tmp_path / "sp.gguf"
    write_gguf(folder, path, types={**TYPES, "lm_head": ("output", Q.F16)})
    import_gguf(path, tmp_path / "m.qbin")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = qformat.load(tmp_path / "m.qbin").tokenizer
    texts = training_text(1)[:12] + ["Hello world, numbers 1234 and ünïcode ☃ bytes.", "two  spaces\nand a newline"]
    for text in texts:
        assert tok.encode(text, add_bos=True) == [sp.bos_id()] + sp.encode(text), text
    # and back: a qbin holding the SentencePiece model itself exports as llama.cpp's converter writes it
    convert(folder, tmp_path / "sp.qbin", "int4-g32-sym", head="f16", embed="f16")
    export_gguf(tmp_path / "sp.qbin", tmp_path / "back.gguf")
    meta = gguf.GGUFReader(tmp_path / "back.gguf")
    assert meta.get_field("tokenizer.ggml.model").contents() == "llama"
    import_gguf(tmp_path / "back.gguf", tmp_path / "back.qbin")
    tok = qformat.load(tmp_path / "back.qbin").tokenizer
    for text in texts:
        assert tok.encode(text, add_bos=True) == [sp.bos_id()] + sp.encode(text), text
