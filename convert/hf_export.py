"""A qbin file as a quantized Hugging Face folder that transformers, vLLM and SGLang load.

Two layouts (LAYOUTS below), both integer grids `ŵ = s·(q − z)` in groups of G input columns:

- compressed-tensors (llm-compressor's format): weight-only tensors as `pack-quantized`
  (weight_packed, weight_scale, weight_zero_point when asymmetric, weight_shape), W8A8 as
  `int-quantized` (int8 weight, per-token dynamic int8 activations). One config group per grid,
  its targets the module names.
- GPTQ (AutoGPTQ / GPTQModel, vLLM's gptq and gptq_marlin): qweight, qzeros, scales, g_idx; one
  grid for the whole model; act-order is g_idx.

Codes and scales are copied, so the folder's dequantized weights equal qrun's. What a layout
cannot hold (outliers, 16-bit columns, float minimums, nf4, n:m sparsity, groups that do not
divide the row, and for compressed-tensors act-order, whose g_idx form it and vLLM removed) is
refused with one line naming the tensor, or, with `fold`, requantized onto the layout's grid by
round-to-nearest (the added error is reported). Quantized embeddings are written dequantized in
float16 (neither layout quantizes them for transformers); so is a GPTQ folder's LM head.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qformat import tensors as T
from qformat.packing import unpack_codes
from qformat.reader import QbinReader
from qformat.schemes import KINDS, QUANT_KINDS, Tensor, quantize_rtn

from .architectures import TENSOR_MAP
from .hf_config import hf_config_of
from .hf_packing import pack_int32
from .plan import ConvertError, weight_tensors


@dataclass(frozen=True)
class Grid:
    """The integer grid of one exported linear layer: what a quantization_config describes."""

    bits: int
    group_size: int  # 0: one group per row
    symmetric: bool
    act_order: bool  # stored columns are permuted (qbin `perm`): GPTQ's desc_act / g_idx
    int8_inputs: bool  # W8A8: inputs quantized to int8 per token at run time

    def label(self) -> str:
        return (f"int{self.bits}{f'-g{self.group_size}' if self.group_size else ''}{'-sym' if self.symmetric else ''}"
                f"{'-act-order' if self.act_order else ''}{'-w8a8' if self.int8_inputs else ''}")


def grid_of(t: Tensor) -> Grid | str:
    """The Grid of a quantized tensor, or why no integer grid holds it exactly."""
    if t.kind not in QUANT_KINDS or KINDS[t.kind].nf4:
        return f"is {t.kind}, which has no integer grid"
    if "offsets" in t.arrays:
        return "stores float minimums (offsets), not integer zero-points"
    extra = [what for role, what in _SIDECARS.items() if role in t.arrays]
    if extra:
        return "carries " + ", ".join(extra)
    if t.sparsity is not None:
        return f"is {t.sparsity[0]}:{t.sparsity[1]} sparse"
    if t.shape[1] % t.group_size:
        return f"has groups of {t.group_size}, which do not divide its {t.shape[1]} columns"
    if t.activation is not None and t.activation.get("mode") != "dynamic":
        return "quantizes its inputs with a static scale"
    group = 0 if t.group_size >= t.shape[1] else t.group_size
    return Grid(KINDS[t.kind].bits, group, t.symmetric, "perm" in t.arrays, t.activation is not None)


_SIDECARS = {"outlier_rowptr": "sparse outliers", "fp_cols": "16-bit input columns",
             "input_scale": "unfolded SmoothQuant factors"}


def codes_in_input_order(t: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes (R, K) uint8 with column i the code of input channel i, group of each channel (K,))."""
    rows, k = t.shape
    stored = unpack_codes(t.arrays["codes"], k, t.group_size, KINDS[t.kind].bits)
    group = np.arange(k, dtype=np.int32) // t.group_size
    if "perm" not in t.arrays:
        return stored, group
    perm = np.asarray(t.arrays["perm"], np.int64)
    codes = np.empty_like(stored)
    codes[:, perm] = stored
    g_idx = np.empty(k, np.int32)
    g_idx[perm] = group
    return codes, g_idx


def zeros_of(t: Tensor) -> np.ndarray:
    """z per group (R, G) as integers, 2^(bits−1) when symmetric."""
    if t.symmetric:
        return np.full(t.arrays["scales"].shape, 1 << (KINDS[t.kind].bits - 1), np.uint8)
    return np.asarray(t.arrays["zeros"], np.uint8)


# ---------------------------------------------------------------------------- layouts


class Layout:
    """One target format: the grids it holds, how a layer's arrays are named and packed, and
    the quantization_config that describes them."""

    name: str
    quantizes_head: bool  # whether the LM head may stay quantized

    def refuse(self, g: Grid) -> str | None:
        """Why this layout cannot hold grid g (None: it can)."""
        raise NotImplementedError

    def check_model(self, grids: dict[str, Grid], tensors: dict[str, Tensor]) -> None:
        """Model-wide limits (ConvertError), given the grid of every tensor exported quantized."""

    def encode(self, t: Tensor, g: Grid) -> dict[str, np.ndarray]:
        """The layer's arrays, by suffix of its module name."""
        raise NotImplementedError

    def config(self, groups: dict[Grid, list[str]], linears: set[str]) -> dict:
        """config.json's quantization_config for grid -> module names (`linears`: every linear
        module of the model, quantized or not)."""
        raise NotImplementedError


class CompressedTensors(Layout):
    name, quantizes_head = "compressed-tensors", True

    def refuse(self, g):
        if g.act_order:
            return ("is act-order, whose g_idx form compressed-tensors and vLLM no longer read; export --to gptq, "
                    "or pass --fold to requantize it in input order")
        if g.int8_inputs and g.bits != 8:
            return "has int8 inputs with sub-8-bit weights, which no compressed-tensors scheme holds"
        return None

    def encode(self, t, g):
        codes, _ = codes_in_input_order(t)
        half = 1 << (g.bits - 1)
        out: dict[str, np.ndarray] = {"weight_scale": np.asarray(t.arrays["scales"], np.float16)}
        if g.int8_inputs:  # int-quantized: the signed codes as int8
            out["weight"] = (codes.astype(np.int16) - half).astype(np.int8)
            if not g.symmetric:
                out["weight_zero_point"] = (zeros_of(t).astype(np.int16) - half).astype(np.int8)
            return out
        out["weight_packed"] = pack_int32(codes, g.bits)  # the stream of code = signed + 2^(b−1)
        out["weight_shape"] = np.asarray(t.shape, np.int64)
        if not g.symmetric:  # signed z − 2^(b−1), packed the same way along the output dimension
            out["weight_zero_point"] = np.ascontiguousarray(pack_int32(zeros_of(t).T, g.bits).T)
        return out

    def config(self, groups, linears):
        from importlib.metadata import PackageNotFoundError, version

        try:
            ct_version = version("compressed-tensors")
        except PackageNotFoundError:
            ct_version = None
        config_groups = {}
        for i, (g, modules) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].label())):
            weights = {"num_bits": g.bits, "type": "int", "symmetric": g.symmetric, "dynamic": False,
                       "strategy": "group" if g.group_size else "channel", "group_size": g.group_size or None,
                       "actorder": None, "observer": "minmax"}
            inputs = ({"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
                       "group_size": None, "actorder": None, "observer": None} if g.int8_inputs else None)
            # one grid for every quantized layer: llm-compressor's form, "Linear" minus `ignore`
            targets = ["Linear"] if len(groups) == 1 else sorted(modules)
            config_groups[f"group_{i}"] = {"targets": targets, "weights": weights, "input_activations": inputs,
                                           "output_activations": None,
                                           "format": "int-quantized" if g.int8_inputs else "pack-quantized"}
        formats = {c["format"] for c in config_groups.values()}
        return {"quant_method": "compressed-tensors",
                "format": formats.pop() if len(formats) == 1 else "mixed-precision",
                "quantization_status": "compressed", "config_groups": config_groups,
                "ignore": sorted(linears - {m for ms in groups.values() for m in ms}),
                "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
                "version": ct_version}


class Gptq(Layout):
    """AutoGPTQ's layout. checkpoint_format "gptq" stores z − 1 in qzeros, which cannot hold
    z = 0; a model with such a zero-point is written as GPTQModel's "gptq_v2" (z as it is)."""

    name, quantizes_head = "gptq", False

    def __init__(self):
        self.v2 = False

    def refuse(self, g):
        if g.int8_inputs:
            return "quantizes its inputs to int8 (W8A8), which GPTQ cannot describe; export --to compressed-tensors"
        if g.bits not in (2, 4, 8):
            return f"is {g.bits}-bit; GPTQ's packing holds 2, 4 and 8 bits (pass --fold for int4)"
        return None

    def check_model(self, grids, tensors):
        distinct = {dataclasses.replace(g, act_order=False) for g in grids.values()}
        if len(distinct) > 1:
            raise ConvertError(f"GPTQ's quantization_config holds one grid for the whole model; this file mixes "
                               f"{', '.join(sorted(g.label() for g in distinct))}: export --to compressed-tensors")
        self.v2 = any(not g.symmetric and np.any(np.asarray(tensors[n].arrays["zeros"]) == 0) for n, g in grids.items())

    def encode(self, t, g):
        rows, k = t.shape
        per = 32 // g.bits
        if k % per or rows % per:
            raise ConvertError(f"tensor {t.name}: GPTQ packs {per} values per int32 along both dimensions; "
                               f"{rows}x{k} is not a multiple of {per}")
        codes, g_idx = codes_in_input_order(t)
        z = zeros_of(t).astype(np.int16)
        return {"qweight": np.ascontiguousarray(pack_int32(codes, g.bits).T),
                "qzeros": pack_int32((z if self.v2 else z - 1).T.astype(np.uint8), g.bits),
                "scales": np.ascontiguousarray(np.asarray(t.arrays["scales"], np.float16).T),
                "g_idx": g_idx}

    def config(self, groups, linears):
        (g, *_), act_order = groups, any(g.act_order for g in groups)
        return {"quant_method": "gptq", "bits": g.bits, "group_size": g.group_size or -1, "desc_act": act_order,
                "sym": g.symmetric, "true_sequential": True, "static_groups": False,
                "checkpoint_format": "gptq_v2" if self.v2 else "gptq", "damp_percent": 0.01}


LAYOUTS: dict[str, Callable[[], Layout]] = {"compressed-tensors": CompressedTensors, "gptq": Gptq}


# ---------------------------------------------------------------------------- export


@dataclass
class HfExportReport:
    """What an export wrote: each quantized tensor's grid, and the error any change added."""

    dst: Path
    layout: str
    grids: dict[str, str] = field(default_factory=dict)  # qbin tensor -> grid label
    folded: dict[str, float] = field(default_factory=dict)  # tensor -> relative RMS error added by --fold
    dequantized: list[str] = field(default_factory=list)  # quantized tensors written in float16
    notes: list[str] = field(default_factory=list)
    file_size: int = 0

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for label in self.grids.values():
            counts[label] = counts.get(label, 0) + 1
        lines = [f"wrote {self.dst} ({self.layout}, {self.file_size / 1e6:.2f} MB of weights): "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))]
        if self.dequantized:
            lines.append(f"written dequantized in float16 (not quantized by {self.layout} loaders): "
                         + ", ".join(self.dequantized))
        if self.folded:
            worst = max(self.folded, key=self.folded.get)
            lines.append(f"--fold requantized {len(self.folded)} tensor(s) by round-to-nearest: relative RMS error "
                         f"up to {self.folded[worst]:.2e} ({worst})")
        return "\n".join(lines + self.notes)


_RULES = {rule.tensor: rule for rule in TENSOR_MAP}


def _fold(t: Tensor, layout: Layout) -> tuple[Tensor, Grid, float]:
    """t requantized by round-to-nearest onto the nearest grid the layout holds."""
    w = t.dequantize()
    k = t.shape[1]
    bits = KINDS[t.kind].bits
    if layout.refuse(Grid(bits, 0, True, False, False)):  # a width the layout cannot pack
        bits = 4 if bits < 4 else 8
    group = next((g for g in range(min(t.group_size, k), 7, -1) if k % g == 0 and g % 8 == 0), k)
    symmetric = t.symmetric or KINDS[t.kind].nf4
    folded = quantize_rtn(t.name, w, KINDS[f"q{bits}"], group, symmetric)
    if t.activation is not None and bits == 8:
        folded = dataclasses.replace(folded, activation={"bits": 8, "mode": "dynamic"})
    err = float(np.sqrt(np.mean((folded.dequantize() - w) ** 2) / max(float(np.mean(w ** 2)), 1e-30)))
    grid = grid_of(folded)
    return folded, grid, err


def export_hf(src: str | os.PathLike, dst: str | os.PathLike, layout: str, *, fold: bool = False,
              force: bool = False) -> HfExportReport:
    """Write the qbin `src` as the Hugging Face folder `dst` in `layout` ("compressed-tensors" or
    "gptq"). Tensors the layout cannot hold raise ConvertError naming them, unless `fold`. The
    folder appears only when complete (a temporary folder beside it is renamed)."""
    import torch
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ConvertError(f"unknown export layout {layout!r}; known: gguf, {', '.join(LAYOUTS)}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists; pass --force to replace it")
    if not dst.parent.is_dir():
        raise ConvertError(f"{dst}: folder {dst.parent} does not exist")
    target = LAYOUTS[layout]()
    reader = QbinReader(src)
    args = reader.model
    try:
        config = hf_config_of(args)
    except ValueError as e:
        raise ConvertError(f"{src}: {e}") from None
    report = HfExportReport(dst, layout)
    tensors: dict[str, Tensor] = {}
    grids: dict[str, Grid] = {}
    refused: list[str] = []
    hf_names: dict[str, str] = {}
    # every Linear transformers builds; a tied model has no head tensor but an lm_head all the same
    linears = {_RULES[T.OUTPUT].hf_name().removesuffix(".weight")}
    for t, entry, layer in weight_tensors(reader, "Hugging Face"):
        name = t.name
        hf_names[name] = _RULES[entry].hf_name(layer)
        if entry.role == "linear":
            linears.add(hf_names[name].removesuffix(".weight"))
        tensors[name] = t
        if t.kind not in QUANT_KINDS:
            continue
        if entry.role == "embed" or (entry.role == "head" and not target.quantizes_head):
            report.dequantized.append(name)
            continue
        grid = grid_of(t)
        why = grid if isinstance(grid, str) else target.refuse(grid)
        if why is not None and fold:
            tensors[name], grid, report.folded[name] = _fold(t, target)
            why = None
        if why is not None:
            refused.append(f"{name} {why}")
            continue
        grids[name] = grid
        report.grids[name] = grid.label()
    if refused:
        raise ConvertError(f"{len(refused)} tensor(s) cannot be exported to {layout}: {'; '.join(refused[:3])}"
                           f"{'; ...' if len(refused) > 3 else ''}. Pass --fold to requantize them onto its grid "
                           "(the error is reported)")
    target.check_model(grids, tensors)

    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        hf = hf_names[name]
        if name in grids:
            module = hf.removesuffix(".weight")
            for suffix, a in target.encode(t, grids[name]).items():
                state[f"{module}.{suffix}"] = torch.from_numpy(np.array(a))
        elif t.kind in QUANT_KINDS:
            state[hf] = torch.from_numpy(t.dequantize().astype(np.float16))
        elif t.kind == "bf16":
            state[hf] = torch.from_numpy(np.ascontiguousarray(t.arrays["data"]).view(np.int16)).view(torch.bfloat16)
        else:
            state[hf] = torch.from_numpy(np.array(t.arrays["data"]))
    groups: dict[Grid, list[str]] = {}
    for name, g in grids.items():
        groups.setdefault(g, []).append(hf_names[name].removesuffix(".weight"))
    config["quantization_config"] = target.config(groups, linears)

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        save_file(state, tmp / "model.safetensors",
                  metadata={"format": "pt", "qformat.provenance": json.dumps(dataclasses.asdict(reader.provenance))})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(reader), indent=2) + "\n")
        _tokenizer_files(reader, tmp)
        report.file_size = (tmp / "model.safetensors").stat().st_size
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if getattr(target, "v2", False):
        report.notes.append("some zero-points are 0, which GPTQ's v1 qzeros (z − 1) cannot hold: written as "
                            "checkpoint_format gptq_v2 (GPTQModel, vLLM); AutoGPTQ reads v1 only")
    return report


def _generation_config(reader: QbinReader) -> dict:
    args, g = reader.model, reader.generation
    out = {"bos_token_id": args.bos_token_id, "eos_token_id": list(args.eos_token_ids) or None,
           "pad_token_id": args.pad_token_id}
    if g.temperature is not None:
        out["do_sample"] = g.temperature > 0
        if g.temperature > 0:
            out["temperature"] = g.temperature
    for key in ("top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens"):
        if getattr(g, key) is not None:
            out[key] = getattr(g, key)
    return {k: v for k, v in out.items() if v is not None}


def _tokenizer_files(reader: QbinReader, folder: Path) -> None:
    """tokenizer.json or tokenizer.model as stored, and a tokenizer_config.json naming the
    special tokens and carrying the chat template."""
    info = reader.tokenizer
    if info is None:
        raise ConvertError(f"{reader.path}: the file has no tokenizer; a Hugging Face folder needs one")
    data = reader.raw_bytes(info.tensor)
    if info.kind == "hf-json":
        from tokenizers import Tokenizer

        (folder / "tokenizer.json").write_bytes(data)
        token = Tokenizer.from_str(data.decode("utf-8")).id_to_token
        tok_config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        import sentencepiece

        (folder / "tokenizer.model").write_bytes(data)
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        token = sp.id_to_piece
        tok_config = {"tokenizer_class": "LlamaTokenizer", "legacy": False}
    args = reader.model
    tok_config.update(add_bos_token=bool(info.add_bos), add_eos_token=False, model_max_length=args.max_seq_len,
                      clean_up_tokenization_spaces=False)
    for key, i in (("bos_token", args.bos_token_id), ("eos_token", (args.eos_token_ids or [None])[0]),
                   ("pad_token", args.pad_token_id)):
        if i is not None and token(i) is not None:
            tok_config[key] = token(i)
    if reader.chat_template:
        tok_config["chat_template"] = reader.chat_template
        (folder / "chat_template.jinja").write_text(reader.chat_template)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
