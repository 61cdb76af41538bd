"""A qbin file as a GGUF for llama.cpp and ollama, written with gguf-py.

Each tensor maps onto the GGUF type that holds it exactly (GGUF_TYPES below): f32/f16/bf16 as
they are, symmetric int8 and int4 in groups of 32 as Q8_0 and Q4_0 (the same codes and scales),
int4 with offsets (spec §4.2) as Q4_1, and int4 with integer zero-points in groups of 32 as
Q4_1 with minimum −s·z rounded to float16 (the added error is reported). A tensor no GGUF type
holds (other group sizes and widths, act-order, outliers, 16-bit columns, sparsity, nf4) is
refused with one line naming it, unless `requantize` names a type gguf-py can quantize to (then
the added error is reported). llama.cpp's q/k row permutation is applied for Llama.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qformat import tensors as T
from qformat.reader import QbinReader
from qformat.schemes import FILE_KINDS, Tensor

from .gguf_import import BYTE_LEVEL_PRE, CONTROL, GGUF_ARCHS, GROUP, USER_DEFINED, tensor_names, unpermute_rows
from .plan import ConvertError, weight_tensors

NORMAL, UNUSED = 1, 5  # tokenizer.ggml.token_type of ordinary and padding entries


@dataclass
class ExportReport:
    """What an export wrote: GGUF type per tensor and the error any mapping added."""

    dst: Path
    types: dict[str, str] = field(default_factory=dict)  # qbin tensor -> GGUF type
    notes: list[str] = field(default_factory=list)
    file_size: int = 0
    # tensor -> max |added error| of storing integer zero-points as Q4_1's float16 minimum
    minimum_error: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        lines = [f"wrote {self.dst} ({self.file_size / 1e6:.2f} MB): "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())), *self.notes]
        if self.minimum_error:
            worst = max(self.minimum_error, key=self.minimum_error.get)
            lines.append(f"{len(self.minimum_error)} tensor(s) with zero-points stored as Q4_1's float16 minimum "
                         f"-s*z: at most {self.minimum_error[worst]:.2e} added per weight ({worst})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- tensors


def _halves(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, np.float16).view(np.uint8).reshape(*values.shape, 2)


def _blocks(t: Tensor, *fields: np.ndarray) -> np.ndarray:
    rows, k = t.shape
    parts = [f.reshape(rows, k // GROUP, -1) for f in fields]
    return np.concatenate(parts, axis=2).reshape(rows, -1)


def q8_0(t: Tensor) -> np.ndarray:
    rows, k = t.shape
    qs = (np.asarray(t.arrays["codes"], np.int16) - 128).astype(np.int8).view(np.uint8)
    return _blocks(t, _halves(t.arrays["scales"]), qs.reshape(rows, k // GROUP, GROUP))


def q4_0(t: Tensor) -> np.ndarray:
    rows, k = t.shape
    return _blocks(t, _halves(t.arrays["scales"]), np.asarray(t.arrays["codes"]).reshape(rows, k // GROUP, 16))


def q4_1(t: Tensor) -> np.ndarray:
    """Offsets as they are; integer zeros as the minimum −s·z, rounded to float16 (reported)."""
    rows, k = t.shape
    if "offsets" in t.arrays:
        m = np.asarray(t.arrays["offsets"])
    else:
        m = (-np.asarray(t.arrays["scales"], np.float32) * np.asarray(t.arrays["zeros"], np.float32)).astype(np.float16)
    return _blocks(t, _halves(t.arrays["scales"]), _halves(m), np.asarray(t.arrays["codes"]).reshape(rows, k // GROUP, 16))


def _mapping(t: Tensor) -> tuple[str, Callable[[Tensor], np.ndarray]] | str:
    """(GGUF type name, encoder) for a tensor some GGUF type holds, else why none does."""
    if t.kind in ("f32", "f16", "bf16"):
        return t.kind.upper(), lambda t: np.asarray(t.arrays["data"])
    extra = sorted(set(t.arrays) - {"codes", "scales", "zeros", "offsets"})
    if extra or t.sparsity is not None or t.activation is not None:
        return f"carries {', '.join(extra) or 'n:m sparsity or int8 activations'}, which GGUF cannot store"
    if len(t.shape) != 2 or t.group_size != GROUP or t.shape[1] % GROUP:
        return f"is {t.kind} in groups of {t.group_size}; GGUF's Q4_0/Q4_1/Q8_0 need groups of 32"
    if t.kind == "q8" and t.symmetric:
        return "Q8_0", q8_0
    if t.kind == "q4":
        return ("Q4_0", q4_0) if t.symmetric else ("Q4_1", q4_1)
    return f"is {t.kind}{' with zero-points' if not t.symmetric else ''}, which no GGUF type holds exactly"


# ---------------------------------------------------------------------------- tokenizer


def _tokenizer(writer, reader: QbinReader, vocab_size: int) -> None:
    info = reader.tokenizer
    if info is not None and info.kind == "sentencepiece":
        _sentencepiece(writer, reader.raw_bytes(info.tensor), vocab_size, info.add_bos)
        return
    if info is None or info.kind != "hf-json":
        raise ConvertError(f"{reader.path}: the file has no tokenizer; GGUF export needs one")
    spec = json.loads(reader.raw_bytes(info.tensor))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or spec.get("normalizer") is not None:
        raise ConvertError(f"{reader.path}: the tokenizer is not a plain byte-level BPE (model {model.get('type')}, "
                           f"pre-tokenizer {pre.get('type')}); GGUF export supports that one so far")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, NORMAL
    for a in spec.get("added_tokens", []):
        if a["id"] < vocab_size:
            tokens[a["id"]], types[a["id"]] = a["content"], CONTROL if a.get("special") else USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(BYTE_LEVEL_PRE[0])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    writer.add_add_bos_token(bool(info.add_bos))


# llama.cpp's token types of a SentencePiece vocabulary, as its converter assigns them
SP_UNKNOWN, SP_BYTE = 2, 6


def _sentencepiece(writer, proto: bytes, vocab_size: int, add_bos: bool) -> None:
    """A SentencePiece model as llama.cpp's converter writes one: tokenizer model "llama",
    every piece with its score and type; ids past the model's pieces are padding."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()
    if n > vocab_size:
        raise ConvertError(f"the SentencePiece model has {n} pieces, more than the model's vocabulary of {vocab_size}")
    types = [SP_UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else SP_BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)] + [f"[PAD{i}]" for i in range(n, vocab_size)])
    writer.add_token_scores([float(sp.get_score(i)) for i in range(n)] + [-1000.0] * (vocab_size - n))
    writer.add_token_types(types + [UNUSED] * (vocab_size - n))
    writer.add_add_bos_token(bool(add_bos))
    if sp.unk_id() >= 0:
        writer.add_unk_token_id(sp.unk_id())


# ---------------------------------------------------------------------------- export


def export_gguf(src: str | Path, dst: str | Path, requantize: str | None = None, *, force: bool = False) -> ExportReport:
    """Write the qbin `src` as the GGUF `dst`; `requantize` (e.g. "Q4_0", "Q8_0") for tensors
    no GGUF type holds, else ConvertError names the first such tensor. Nothing is left at dst
    unless the export completes."""
    import gguf

    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists; pass --force to replace it")
    if not dst.parent.is_dir():
        raise ConvertError(f"{dst}: folder {dst.parent} does not exist")
    target = None
    if requantize is not None:
        target = getattr(gguf.GGMLQuantizationType, requantize.upper(), None)
        if target is None:
            raise ConvertError(f"--requantize {requantize}: not a GGUF type (e.g. Q4_0, Q4_1, Q5_0, Q8_0)")
    reader = QbinReader(src)
    args = reader.model
    arch = next((a for a in GGUF_ARCHS.values() if a.arch == args.arch), None)
    if arch is None:
        raise ConvertError(f"{src}: architecture {args.arch!r} has no GGUF export (supported: "
                           f"{', '.join(a.arch for a in GGUF_ARCHS.values())})")
    if args.rope_scaling is not None and args.rope_scaling.kind != "linear":
        raise ConvertError(f"{src}: rope scaling {args.rope_scaling.kind!r} has no GGUF export yet (linear has)")
    if target is None:
        refused = [(n, why) for n in reader.names() if reader[n].kind not in FILE_KINDS
                   for why in [_mapping(reader[n])] if isinstance(why, str)]
        if refused:
            listed = "; ".join(f"{n} {why}" for n, why in refused[:3])
            raise ConvertError(f"{len(refused)} tensor(s) have no GGUF type: {listed}"
                               f"{'; ...' if len(refused) > 3 else ''}. Pass --requantize TYPE (e.g. Q4_0) to "
                               "requantize them, or convert with --scheme int4-g32 (no act-order, outliers or "
                               "16-bit columns)")
    report = ExportReport(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch.name)
        _metadata(w, reader, args)
        _tokenizer(w, reader, args.vocab_size)
        gguf_names = tensor_names()
        for t, entry, layer in weight_tensors(reader, "GGUF"):
            data, qtype = _encode(t, target, report, gguf)
            if arch.permuted_qk and entry in (T.ATTN_Q, T.ATTN_K):
                heads = args.n_heads if entry is T.ATTN_Q else args.n_kv_heads
                data = data[np.argsort(unpermute_rows(t.shape[0], heads))]
            w.add_tensor(gguf_names[entry].format(i=layer), data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    report.file_size = dst.stat().st_size
    return report


def _encode(t: Tensor, target, report: ExportReport, gguf) -> tuple[np.ndarray, object]:
    """(data for GGUFWriter.add_tensor, raw GGUF type or None for float arrays)."""
    Q = gguf.GGMLQuantizationType
    mapped = _mapping(t)
    if isinstance(mapped, tuple):
        type_name, encode = mapped
        report.types[t.name] = type_name
        data = encode(t)
        if type_name == "BF16":
            return np.ascontiguousarray(data).view(np.uint8), Q.BF16
        if type_name == "Q4_1" and "zeros" in t.arrays:
            err = float(np.abs(gguf.quants.dequantize(data, Q.Q4_1).reshape(t.shape) - t.dequantize()).max())
            report.minimum_error[t.name] = err
        return data, getattr(Q, type_name) if type_name not in ("F32", "F16") else None
    if len(t.shape) != 2:
        raise ConvertError(f"tensor {t.name} {mapped}")
    w = t.dequantize()
    try:
        data = gguf.quants.quantize(w, target)
    except Exception as e:  # gguf-py cannot quantize every type (K-quants)
        raise ConvertError(f"--requantize {target.name}: gguf-py cannot quantize to it ({e}); use Q4_0, Q4_1, "
                           "Q5_0, Q5_1 or Q8_0") from None
    back = gguf.quants.dequantize(data, target)
    rel = float(np.sqrt(np.mean((back - w) ** 2) / max(np.mean(w ** 2), 1e-30)))
    report.types[t.name] = target.name
    report.notes.append(f"{t.name}: {mapped}; requantized to {target.name} (relative RMS error {rel:.2e})")
    return data, target


def _metadata(w, reader: QbinReader, args) -> None:
    import gguf

    w.add_name(reader.provenance.source or reader.path.stem)
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    if args.rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args.rope_scaling.factor)
    if args.bos_token_id is not None:
        w.add_bos_token_id(args.bos_token_id)
    if args.eos_token_ids:
        w.add_eos_token_id(args.eos_token_ids[0])
    if args.pad_token_id is not None:
        w.add_pad_token_id(args.pad_token_id)
    if reader.chat_template:
        w.add_chat_template(reader.chat_template)
    w.add_string("qformat.provenance", json.dumps(dataclasses.asdict(reader.provenance), sort_keys=True))
