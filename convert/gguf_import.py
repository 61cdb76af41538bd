"""A GGUF file (llama.cpp, ollama) into a qbin, read with gguf-py.

F32, F16 and BF16 tensors are stored as they are; Q8_0, Q4_0 and Q4_1 map onto qbin kinds bit
for bit (GGUF_KINDS below): their dequantized weights equal gguf-py's (and llama.cpp's). Other
types (K-quants, IQ types, Q5_0/Q5_1) have no qbin layout; they are dequantized by gguf-py and
requantized with the scheme the user names, and the report says so. Hyper-parameters,
tokenizer (BPE vocabulary and merges) and chat template come from the metadata; llama.cpp's
q/k row permutation of Llama checkpoints is undone.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qformat import tensors as T
from qformat.config import ModelArgs, Provenance, RopeScaling
from qformat.schemes import Tensor, float_tensor, parse_scheme
from qformat.writer import QbinWriter

from .hf_tokenizer import TokenizerFiles, tokenizer_json_files
from .plan import ConvertError
from .provenance import CONVERTER, SourceFiles, created_timestamp
from .report import ConvertReport, TensorReport
from .rtn import quantize_weight

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufArch:
    """How one GGUF `general.architecture` maps onto ModelArgs."""

    name: str  # general.architecture, also the prefix of its metadata keys
    arch: str  # ModelArgs.arch
    # llama.cpp's converter interleaves the rotary halves of q and k rows for Llama (its rope is
    # the GPT-J pairing); Qwen's GGUFs keep the NeoX order qbin uses
    permuted_qk: bool


GGUF_ARCHS = {a.name: a for a in (
    GgufArch("llama", "llama", permuted_qk=True),
    GgufArch("qwen2", "qwen2", permuted_qk=False),
    GgufArch("qwen3", "qwen3", permuted_qk=False),
)}


def tensor_names() -> dict[T.TensorName, str]:
    """qbin tensor entry -> its GGUF name ("{i}" for the layer), from gguf-py's own table."""
    import gguf

    M = gguf.MODEL_TENSOR
    pairs = {
        T.TOK_EMBEDDINGS: (M.TOKEN_EMBD, "weight"), T.ATTN_NORM: (M.ATTN_NORM, "weight"),
        T.ATTN_Q: (M.ATTN_Q, "weight"), T.ATTN_Q_BIAS: (M.ATTN_Q, "bias"),
        T.ATTN_K: (M.ATTN_K, "weight"), T.ATTN_K_BIAS: (M.ATTN_K, "bias"),
        T.ATTN_V: (M.ATTN_V, "weight"), T.ATTN_V_BIAS: (M.ATTN_V, "bias"),
        T.ATTN_OUT: (M.ATTN_OUT, "weight"), T.ATTN_Q_NORM: (M.ATTN_Q_NORM, "weight"),
        T.ATTN_K_NORM: (M.ATTN_K_NORM, "weight"), T.FFN_NORM: (M.FFN_NORM, "weight"),
        T.FFN_GATE: (M.FFN_GATE, "weight"), T.FFN_UP: (M.FFN_UP, "weight"), T.FFN_DOWN: (M.FFN_DOWN, "weight"),
        T.ATTN_POST_NORM: (M.ATTN_POST_NORM, "weight"), T.FFN_POST_NORM: (M.FFN_POST_NORM, "weight"),
        T.FFN_ROUTER: (M.FFN_GATE_INP, "weight"),
        T.FFN_SHARED_GATE: (M.FFN_GATE_SHEXP, "weight"), T.FFN_SHARED_UP: (M.FFN_UP_SHEXP, "weight"),
        T.FFN_SHARED_DOWN: (M.FFN_DOWN_SHEXP, "weight"), T.FFN_SHARED_ROUTER: (M.FFN_GATE_INP_SHEXP, "weight"),
        T.OUTPUT_NORM: (M.OUTPUT_NORM, "weight"), T.OUTPUT: (M.OUTPUT, "weight"),
    }
    assert set(pairs) == set(T.TENSORS), "a qbin tensor has no GGUF name"
    return {t: gguf.TENSOR_NAMES[m].replace("{bid}", "{i}") + "." + suffix for t, (m, suffix) in pairs.items()}


# ---------------------------------------------------------------------------- exact types

GROUP = 32  # the block of Q8_0, Q4_0 and Q4_1


def _blocks(data: np.ndarray, rows: int, k: int, block_bytes: int, name: str) -> np.ndarray:
    if k % GROUP or data.size != rows * (k // GROUP) * block_bytes:
        raise ConvertError(f"tensor {name}: {data.size} bytes do not hold {rows} rows of {k} columns "
                           "in blocks of 32; the GGUF file is corrupted")
    return np.ascontiguousarray(data, np.uint8).reshape(rows, k // GROUP, block_bytes)


def _matrix(shape: tuple[int, ...], name: str) -> tuple[int, int]:
    if len(shape) != 2:
        raise ConvertError(f"tensor {name}: a quantized GGUF tensor of shape {list(shape)} is not a weight matrix")
    return shape


def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 field at byte `start` of every block, as (rows, n_blocks) float16."""
    return np.ascontiguousarray(blocks[:, :, start:start + 2]).view(np.float16)[:, :, 0]


def q8_0(name: str, data: np.ndarray, shape: tuple[int, ...]) -> Tensor:
    """Q8_0 (f16 d, 32 int8 q; w = d·q) = symmetric q8 in groups of 32: code q + 128, z = 128."""
    rows, k = _matrix(shape, name)
    b = _blocks(data, rows, k, 34, name)
    codes = (b[:, :, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(rows, k)
    return Tensor(name, "q8", (rows, k), {"codes": codes, "scales": _halves(b, 0)}, GROUP, True)


def q4_0(name: str, data: np.ndarray, shape: tuple[int, ...]) -> Tensor:
    """Q4_0 (f16 d, 16 bytes: element j low nibble, j + 16 high; w = d·(q − 8)) = symmetric q4
    in groups of 32, whose planar nibble order (spec §5) is the same bytes."""
    rows, k = _matrix(shape, name)
    b = _blocks(data, rows, k, 18, name)
    codes = np.ascontiguousarray(b[:, :, 2:]).reshape(rows, k // 2)
    return Tensor(name, "q4", (rows, k), {"codes": codes, "scales": _halves(b, 0)}, GROUP, True)


def q4_1(name: str, data: np.ndarray, shape: tuple[int, ...]) -> Tensor:
    """Q4_1 (f16 d, f16 m, 16 nibble bytes as Q4_0; w = d·q + m) = q4 with offsets (spec §4.2)."""
    rows, k = _matrix(shape, name)
    b = _blocks(data, rows, k, 20, name)
    codes = np.ascontiguousarray(b[:, :, 4:]).reshape(rows, k // 2)
    arrays = {"codes": codes, "scales": _halves(b, 0), "offsets": _halves(b, 2)}
    return Tensor(name, "q4", (rows, k), arrays, GROUP, False)


def _float(kind: str) -> Callable[[str, np.ndarray, tuple[int, ...]], Tensor]:
    def build(name: str, data: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        values = np.ascontiguousarray(data).view({"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[kind])
        if values.size != int(np.prod(shape)):
            raise ConvertError(f"tensor {name}: {values.size} values for shape {list(shape)}; the GGUF file is "
                               "corrupted")
        return Tensor(name, kind, shape, {"data": values.reshape(shape)})
    return build


def _gguf_kinds() -> dict:
    import gguf

    Q = gguf.GGMLQuantizationType
    return {Q.F32: _float("f32"), Q.F16: _float("f16"), Q.BF16: _float("bf16"),
            Q.Q8_0: q8_0, Q.Q4_0: q4_0, Q.Q4_1: q4_1}


# ---------------------------------------------------------------------------- metadata


class Metadata:
    """The key/value section of an open GGUFReader; missing keys are named in the error."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default=None):
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:
            raise ConvertError(f"{self.path}: GGUF metadata key {key!r} is unreadable ({type(e).__name__}); the file "
                               "is corrupted: re-download it") from None

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConvertError(f"{self.path}: GGUF metadata key {key!r} is missing; the file is not a complete "
                               "model (re-download it, or convert the Hugging Face checkpoint instead)")
        return value


def model_args_of(meta: Metadata, arch: GgufArch, names: set[str], tied: bool) -> ModelArgs:
    """ModelArgs from the `{arch}.*` and `tokenizer.ggml.*` keys."""
    a = arch.name
    dim, n_heads = int(meta.need(f"{a}.embedding_length")), int(meta.need(f"{a}.attention.head_count"))
    tokens = meta.need("tokenizer.ggml.tokens")
    scaling = meta.get(f"{a}.rope.scaling.type")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = RopeScaling("linear", float(meta.need(f"{a}.rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise ConvertError(f"{meta.path}: rope scaling {scaling!r} is not supported (linear is); convert the "
                           "Hugging Face checkpoint instead")
    if "rope_freqs.weight" in names:
        raise ConvertError(f"{meta.path}: the file carries llama.cpp's rope_freqs (Llama 3.1 scaling), which this "
                           "importer does not map yet; convert the Hugging Face checkpoint instead")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    return ModelArgs(
        arch=arch.arch, vocab_size=int(meta.get(f"{a}.vocab_size", len(tokens))), dim=dim,
        n_layers=int(meta.need(f"{a}.block_count")), n_heads=n_heads,
        n_kv_heads=int(meta.get(f"{a}.attention.head_count_kv", n_heads)),
        head_dim=int(meta.get(f"{a}.attention.key_length", dim // n_heads)),
        ffn_dim=int(meta.need(f"{a}.feed_forward_length")),
        norm_eps=float(meta.need(f"{a}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        max_seq_len=int(meta.need(f"{a}.context_length")), tie_embeddings=tied, rope_scaling=rope_scaling,
        qkv_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(i) for i in dict.fromkeys(x for x in (eos, eot) if x is not None)],
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


# llama.cpp's pre-tokenizer names whose splitting is GPT-2's byte-level regex, as tokenizers'
# ByteLevel(use_regex=True) applies it (checked against SmolLM2's own tokenizer.json on the EVAL
# corpora). Others (llama-bpe, qwen2, ...) split differently and are refused until checked.
BYTE_LEVEL_PRE = ("gpt-2", "smollm")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of added tokens


def tokenizer_of(meta: Metadata, path: Path) -> TokenizerFiles:
    """tokenizer.json rebuilt from the GGUF's vocabulary: byte-level BPE with GPT-2's split here
    (checked on the EVAL corpora), every other kind (SentencePiece, the Llama 3 / Qwen2 / ...
    splits) by transformers' GGUF tokenizer builders."""
    model = meta.need("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if model != "gpt2" or pre not in BYTE_LEVEL_PRE:
        return _transformers_tokenizer(meta, path, model, pre)
    tokens = [str(t) for t in meta.need("tokenizer.ggml.tokens")]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [m.split(" ", 1) for m in meta.need("tokenizer.ggml.merges")]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == CONTROL}
             for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    data = json.dumps(spec, ensure_ascii=False).encode("utf-8")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    try:
        return tokenizer_json_files(data, bool(add_bos) if add_bos is not None else False,
                                    meta.get("tokenizer.chat_template"), [path])
    except ValueError as e:
        raise ConvertError(f"{path}: {e}") from None


def _transformers_tokenizer(meta: Metadata, path: Path, model: str, pre: str) -> TokenizerFiles:
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
    except ImportError:
        raise ConvertError(f"{path}: its tokenizer ({model}, pre-tokenizer {pre!r}) is rebuilt by transformers' GGUF "
                           "support: pip install transformers") from None
    # a byte-level vocabulary whose split transformers does not know would tokenize differently
    if model == "gpt2" and pre not in mapping.GGUF_PRE_TOKENIZER_SPLITS and pre != "default":
        raise ConvertError(f"{path}: pre-tokenizer {pre!r} is not supported (known: "
                           f"{', '.join(BYTE_LEVEL_PRE + tuple(mapping.GGUF_PRE_TOKENIZER_SPLITS))}); convert the "
                           "Hugging Face checkpoint instead")
    try:
        architecture, tokenizer, config = mapping.get_gguf_tokenizer(str(path))
        backend, _ = mapping.convert_gguf_tokenizer(architecture, tokenizer)
        data = backend.to_str().encode("utf-8")
        add_bos = bool(config.get("add_bos_token", False))
        return tokenizer_json_files(data, add_bos, meta.get("tokenizer.chat_template"), [path])
    except ConvertError:
        raise
    except Exception as e:  # transformers raises assorted types on vocabularies it cannot build
        raise ConvertError(f"{path}: cannot rebuild its {model} tokenizer ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------- tensors


def unpermute_rows(rows: int, n_heads: int) -> np.ndarray:
    """ids such that gguf_rows[ids] are the Hugging Face rows: llama.cpp stores row h·D + 2j + t
    for HF row h·D + t·D/2 + j (head h, D = head_dim, j < D/2, t in {0, 1})."""
    d = rows // n_heads
    h, t, j = np.meshgrid(np.arange(n_heads), np.arange(2), np.arange(d // 2), indexing="ij")
    return (h * d + 2 * j + t).reshape(-1)


def is_gguf(src: Path) -> bool:
    """Whether src is a GGUF file (by its magic), or a folder holding one and no config.json."""
    return _gguf_path(src) is not None


def _gguf_path(src: Path) -> Path | None:
    if src.is_dir():
        found = sorted(src.glob("*.gguf"))
        return found[0] if len(found) == 1 and not (src / "config.json").is_file() else None
    try:
        with open(src, "rb") as f:
            return src if f.read(4) == GGUF_MAGIC else None
    except OSError:
        return None


def import_gguf(src: str | Path, dst: str | Path, scheme: str | None = None, *, force: bool = False,
                command: str | None = None) -> ConvertReport:
    """Write the GGUF model `src` (a file, or a folder holding one) as the qbin `dst`.

    Tensors of types with a qbin layout are stored without requantization; others need `scheme`
    (e.g. "int4-g64"), which requantizes them (and only them), else ConvertError names them.
    """
    import gguf

    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    path = _gguf_path(src)
    if path is None:
        raise ConvertError(f"{src}: not a GGUF file (no GGUF magic)" if src.is_file() else
                           f"{src}: no single .gguf file in this folder")
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists; pass --force to replace it")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError, ... on a bad file
        raise ConvertError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is truncated "
                           "or corrupted: re-download it") from None
    meta = Metadata(reader, path)
    arch = GGUF_ARCHS.get(meta.need("general.architecture"))
    if arch is None:
        raise ConvertError(f"{path}: GGUF architecture {meta.get('general.architecture')!r} is not supported "
                           f"(supported: {', '.join(GGUF_ARCHS)})")
    by_name = {t.name: t for t in reader.tensors}
    names = tensor_names()
    tied = names[T.OUTPUT] not in by_name
    args = model_args_of(meta, arch, set(by_name), tied)
    tok = tokenizer_of(meta, path)
    kinds = _gguf_kinds()
    requant = parse_scheme(scheme) if scheme else None
    exact: dict[str, int] = {}
    requantized: dict[str, int] = {}
    report = ConvertReport(src, dst, "", args, [], tok.stored.nbytes, 0, 0.0, False, head="", embed="",
                           clip_search=False)

    def load(entry: T.TensorName, layer: int | None) -> tuple[Tensor, str] | None:
        gname = names[entry].format(i=layer)
        if gname not in by_name:
            if entry.present(args):
                raise ConvertError(f"{path}: tensor {gname} is missing; the file is not a complete {arch.name} model")
            return None
        rt = by_name[gname]
        want = entry.shape_of(args)
        shape = tuple(int(d) for d in reversed(rt.shape))  # GGUF lists dimensions innermost first
        if shape != want:
            raise ConvertError(f"{path}: tensor {gname} has shape {list(shape)}, the metadata gives {list(want)}")
        qname = entry.name(layer)
        build = kinds.get(rt.tensor_type)
        type_name = rt.tensor_type.name
        if build is not None:
            t = build(qname, rt.data, shape)
            label = _label(t)
            exact[type_name] = exact.get(type_name, 0) + 1
        else:
            if requant is None and len(shape) == 2:
                raise ConvertError(f"{path}: tensor {gname} is {type_name}, which has no exact qbin layout; pass "
                                   "--scheme (e.g. int4-g64) to requantize such tensors")
            w = gguf.quants.dequantize(rt.data, rt.tensor_type).astype(np.float32).reshape(shape)
            if len(shape) == 1 or not requant.quantized:
                t = float_tensor(qname, w, "f32" if len(shape) == 1 else requant.kind)
            else:
                t = quantize_weight(qname, w, requant, clip_search=False)[0]
            label = t.kind if len(shape) == 1 else requant.name
            requantized[type_name] = requantized.get(type_name, 0) + 1
        if arch.permuted_qk and entry in (T.ATTN_Q, T.ATTN_K):
            t = t.take_rows(unpermute_rows(shape[0], args.n_heads if entry is T.ATTN_Q else args.n_kv_heads))
        return t, label

    order = [(e, None) for e in T.TENSORS if not e.per_layer and e.role == "embed"]
    order += [(e, i) for i in range(args.n_layers) for e in T.TENSORS if e.per_layer]
    order += [(e, None) for e in T.TENSORS if not e.per_layer and e.role != "embed"]
    sources = SourceFiles(path.parent, [path])
    with QbinWriter(dst, overwrite=force) as writer:
        for entry, layer in order:
            if not entry.present(args):
                continue
            loaded = load(entry, layer)
            if loaded is None:
                continue
            t, label = loaded
            writer.add_tensor(t)
            report.tensors.append(TensorReport(t.name, entry.role, tuple(t.shape), label, t.nbytes))
        described = ", ".join(f"{n} x{c}" for n, c in sorted(exact.items()))
        method = f"gguf import: exact {described}" + (
            f"; requantized to {scheme}: " + ", ".join(f"{n} x{c}" for n, c in sorted(requantized.items()))
            if requantized else "")
        sources.check_unchanged()
        provenance = Provenance(source=path.name, source_files=sources.sha256(), converter=CONVERTER,
                                command=command or f"qformat.convert.import_gguf({path.name!r}, {dst.name!r})",
                                scheme="imported", method=method, created=created_timestamp())
        writer.add_tensor(tok.stored)
        writer.finish(model=args, tokenizer=tok.info, chat_template=tok.chat_template, provenance=provenance)
    report.scheme = "gguf " + described
    embed = next(r for r in report.tensors if r.role == "embed")
    report.embed = embed.scheme
    report.head = embed.scheme if tied else next(r.scheme for r in report.tensors if r.role == "head")
    report.notes.append(method)
    report.file_size = dst.stat().st_size
    report.seconds = time.perf_counter() - started
    return report


def _label(t: Tensor) -> str:
    if t.kind not in ("q8", "q4") or not t.group_size:
        return t.kind
    return f"{t.kind}-g{t.group_size}" + ("-offsets" if "offsets" in t.arrays else "-sym" if t.symmetric else "")
