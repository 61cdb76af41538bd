"""A quantized Hugging Face folder (GPTQ, AWQ, compressed-tensors) into a qbin, without
requantization.

config.json's `quantization_config` names the format (FORMATS below); its reader turns each
quantized linear layer into a QuantizedLayer (codes in input-channel order, scales, integer
zero-points, the group of every input channel), which maps onto a qbin affine kind exactly:
`ŵ = s·(q − z)`, act-order's g_idx becoming the `perm` sidecar (spec §6.1). Scales are stored
in float16 as qbin's are; any that float16 does not hold exactly (bfloat16 or float32 scales of
llm-compressor) are rounded and the report says by how much. Everything else (norms, biases,
embeddings, unquantized layers) is copied as it is stored.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qformat import tensors as T
from qformat.config import Provenance
from qformat.packing import pack_codes
from qformat.schemes import Tensor, f32_to_bf16
from qformat.writer import QbinWriter

from .architectures import TENSOR_MAP
from .checkpoint import Checkpoint, CheckpointError
from .hf_config import architecture_of, generation_defaults, model_args
from .hf_packing import awq_deinterleave, unpack_int32
from .hf_tokenizer import read_tokenizer
from .plan import ConvertError
from .provenance import CONVERTER, SourceFiles, created_timestamp
from .report import ConvertReport, TensorReport


@dataclass
class QuantizedLayer:
    """One linear layer as a quantized checkpoint stores it, decoded to integers."""

    codes: np.ndarray  # (R, K) uint8; column i is input channel i
    scales: np.ndarray  # (R, G) float32
    zeros: np.ndarray | None  # (R, G) integers in [0, 2^bits); None: symmetric, z = 2^(bits−1)
    g_idx: np.ndarray | None  # (K,) group of each input channel; None: channel i is in group i // G
    bits: int
    group_size: int
    int8_inputs: bool = False  # W8A8: per-token dynamic int8 activations


def to_tensor(name: str, layer: QuantizedLayer) -> tuple[Tensor, float]:
    """The qbin tensor holding exactly `layer`'s weights (scales rounded to float16), and the
    largest relative change that rounding made to a scale."""
    rows, k = layer.codes.shape
    g = layer.group_size
    codes, perm = layer.codes, None
    if layer.g_idx is not None and not np.array_equal(layer.g_idx, np.arange(k) // g):
        perm = np.argsort(layer.g_idx, kind="stable").astype(np.int32)
        if not np.array_equal(layer.g_idx[perm], np.arange(k) // g):
            raise ConvertError(f"tensor {name}: g_idx does not put {g} input channels in each group; it cannot "
                               "be stored as a column permutation")
        codes = codes[:, perm]
    scales = layer.scales.astype(np.float16)
    if not np.all(np.isfinite(scales)):
        raise ConvertError(f"tensor {name}: a scale is beyond float16's range (or not finite)")
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.abs(scales.astype(np.float32) - layer.scales) / np.abs(layer.scales)
    rounding = float(np.nanmax(change, initial=0.0))
    arrays = {"codes": pack_codes(codes, g, layer.bits), "scales": scales}
    half = 1 << (layer.bits - 1)
    symmetric = layer.zeros is None or bool(np.all(layer.zeros == half))
    if not symmetric:
        z = np.asarray(layer.zeros)
        if z.min() < 0 or z.max() >= 1 << layer.bits:
            raise ConvertError(f"tensor {name}: zero-points outside [0, {1 << layer.bits}) have no qbin layout")
        arrays["zeros"] = z.astype(np.uint8)
    if perm is not None:
        arrays["perm"] = perm
    activation = {"bits": 8, "mode": "dynamic"} if layer.int8_inputs else None
    return Tensor(name, f"q{layer.bits}", (rows, k), arrays, g, symmetric, activation=activation), rounding


# ---------------------------------------------------------------------------- formats


class FormatReader:
    """Reads the quantized layers of one checkpoint format."""

    def __init__(self, qconfig: dict, ckpt: Checkpoint, where: Path):
        self.qconfig, self.ckpt, self.where = qconfig, ckpt, where

    def describe(self) -> str:
        raise NotImplementedError

    def layer(self, module: str, shape: tuple[int, int]) -> QuantizedLayer | None:
        """The module's quantized weights, or None when it is stored in float."""
        raise NotImplementedError

    def _int(self, key: str, *aliases: str, default=None) -> int:
        for k in (key, *aliases):
            if self.qconfig.get(k) is not None:
                return int(self.qconfig[k])
        if default is None:
            raise ConvertError(f"{self.where}: quantization_config lacks {key!r}")
        return default

    def _read(self, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.ckpt:
            raise ConvertError(f"{self.where}: tensor {name} is missing")
        a, dtype = self.ckpt.read_stored(name)
        if dtype not in dtypes:
            raise ConvertError(f"{self.where}: tensor {name} is {dtype}, expected {' or '.join(dtypes)}")
        if tuple(a.shape) != tuple(shape):
            raise ConvertError(f"{self.where}: tensor {name} has shape {list(a.shape)}, expected {list(shape)} "
                               "from config.json and quantization_config")
        return a


FLOAT_DTYPES = ("float16", "bfloat16", "float32")


def _words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


class GptqReader(FormatReader):
    """AutoGPTQ / GPTQModel / optimum: qweight (K·b/32, R), qzeros (G, R·b/32), scales (G, R),
    g_idx (K,). checkpoint_format "gptq" (v1) stores z − 1, "gptq_v2" z itself."""

    def __init__(self, qconfig, ckpt, where):
        super().__init__(qconfig, ckpt, where)
        self.bits = self._int("bits", "w_bit")
        if self.bits not in (2, 4, 8):
            raise ConvertError(f"{where}: GPTQ with {self.bits} bits is not supported (2, 4 and 8 are)")
        self.group = self._int("group_size", default=-1)
        self.v2 = qconfig.get("checkpoint_format", qconfig.get("format", "gptq")) == "gptq_v2"
        if qconfig.get("dynamic"):
            raise ConvertError(f"{where}: GPTQModel's per-module 'dynamic' overrides are not supported yet")

    def describe(self):
        return (f"gptq {self.bits}-bit, group {self.group}, desc_act {bool(self.qconfig.get('desc_act'))}, "
                f"{'v2' if self.v2 else 'v1'} zeros")

    def layer(self, module, shape):
        if f"{module}.qweight" not in self.ckpt:
            return None
        r, k = shape
        b, g = self.bits, (self.group if self.group > 0 else k)
        n_groups = -(-k // g)
        qweight = self._read(f"{module}.qweight", ("int32",), (_words(k, b), r))
        qzeros = self._read(f"{module}.qzeros", ("int32",), (n_groups, _words(r, b)))
        scales = self._read(f"{module}.scales", FLOAT_DTYPES, (n_groups, r))
        g_idx = self._read(f"{module}.g_idx", ("int32", "int64"), (k,)) if f"{module}.g_idx" in self.ckpt else None
        if g_idx is not None and (g_idx.min() < 0 or g_idx.max() >= n_groups):
            raise ConvertError(f"{self.where}: {module}.g_idx names groups outside 0..{n_groups - 1}")
        codes = unpack_int32(np.ascontiguousarray(qweight.T), k, b)
        zeros = unpack_int32(qzeros, r, b).T.astype(np.int16) + (0 if self.v2 else 1)
        return QuantizedLayer(codes, scales.T.astype(np.float32), zeros, g_idx, b, g)


class AwqReader(FormatReader):
    """AutoAWQ GEMM: qweight (K, R/8) and qzeros (G, R/8) packed along R in AWQ's nibble
    order, scales (G, R); w = (q − z)·s."""

    def __init__(self, qconfig, ckpt, where):
        super().__init__(qconfig, ckpt, where)
        self.bits = self._int("bits", "w_bit")
        self.group = self._int("group_size", "q_group_size")
        version = str(qconfig.get("version", "gemm")).lower()
        if self.bits != 4 or version != "gemm":
            raise ConvertError(f"{where}: AWQ {version} with {self.bits} bits is not supported (4-bit GEMM is)")

    def describe(self):
        return f"awq gemm {self.bits}-bit, group {self.group}"

    def layer(self, module, shape):
        if f"{module}.qweight" not in self.ckpt:
            return None
        r, k = shape
        g = self.group if self.group > 0 else k
        n_groups = -(-k // g)
        qweight = self._read(f"{module}.qweight", ("int32",), (k, _words(r, 4)))
        qzeros = self._read(f"{module}.qzeros", ("int32",), (n_groups, _words(r, 4)))
        scales = self._read(f"{module}.scales", FLOAT_DTYPES, (n_groups, r))
        codes = awq_deinterleave(unpack_int32(qweight, r, 4)).T
        zeros = awq_deinterleave(unpack_int32(qzeros, r, 4)).T
        if not self.qconfig.get("zero_point", True):
            zeros = None
        return QuantizedLayer(np.ascontiguousarray(codes), scales.T.astype(np.float32), zeros, None, 4, g)


def _matches(target: str, module: str) -> bool:
    """compressed-tensors' target rule: an exact module name, "re:" + a regex, or a class name
    (every layer read here is a Linear)."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target == "Linear"


class CompressedTensorsReader(FormatReader):
    """llm-compressor's format: `pack-quantized` (weight_packed (R, ceil(K·b/32)), weight_scale,
    weight_zero_point packed along R, weight_g_idx) and `int-quantized` (int8 weight)."""

    FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")

    def __init__(self, qconfig, ckpt, where):
        super().__init__(qconfig, ckpt, where)
        if qconfig.get("sparsity_config"):
            raise ConvertError(f"{where}: compressed-tensors sparsity ({qconfig['sparsity_config'].get('format')}) "
                               "is not supported; export the dense model")
        self.groups = []
        for gname, group in (qconfig.get("config_groups") or {}).items():
            fmt = group.get("format") or qconfig.get("format")
            w, a = group.get("weights") or {}, group.get("input_activations")
            why = None
            if fmt not in self.FORMATS:
                why = f"format {fmt!r}"
            elif w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel", "tensor"):
                why = f"{w.get('type')} weights with strategy {w.get('strategy')!r}"
            elif a is not None and not (a.get("type", "int") == "int" and a.get("num_bits") == 8 and a.get("dynamic")
                                        and a.get("strategy") == "token" and int(w.get("num_bits", 8)) == 8):
                why = "input activations other than int8 per-token dynamic with int8 weights"
            elif group.get("output_activations"):
                why = "quantized output activations"
            if why:
                raise ConvertError(f"{where}: compressed-tensors {gname} has {why}, which has no qbin layout "
                                   f"(supported: int weights, {', '.join(self.FORMATS[:2])}, W8A8 per-token)")
            self.groups.append((group["targets"], w, a is not None, fmt))
        self.ignore = list(qconfig.get("ignore") or [])

    def describe(self):
        return "compressed-tensors " + ", ".join(
            f"{fmt} int{w.get('num_bits')} {w.get('strategy')}{'-g' + str(w['group_size']) if w.get('group_size') else ''}"
            f"{'' if w.get('symmetric', True) else ' asym'}{' w8a8' if a else ''}" for _, w, a, fmt in self.groups)

    def layer(self, module, shape):
        if any(_matches(t, module) for t in self.ignore if t != "Linear"):
            return None
        scheme = next(((w, a, fmt) for targets, w, a, fmt in self.groups if any(_matches(t, module) for t in targets)),
                      None)
        if scheme is None or f"{module}.weight_scale" not in self.ckpt:
            return None
        w, int8_inputs, fmt = scheme
        r, k = shape
        b = int(w.get("num_bits", 8))
        g = int(w["group_size"]) if w.get("strategy") == "group" else k
        n_groups = -(-k // g)
        scale, _ = self.ckpt.read_stored(f"{module}.weight_scale")
        if scale.size == 1:  # strategy "tensor": one scale for all rows
            scale = np.broadcast_to(scale.reshape(1, 1), (r, 1))
        scale = self._shaped(f"{module}.weight_scale", scale, (r, n_groups))
        half = 1 << (b - 1)
        if fmt == "pack-quantized":
            codes = unpack_int32(self._read(f"{module}.weight_packed", ("int32",), (r, _words(k, b))), k, b)
        else:
            codes = (self._read(f"{module}.weight", ("int8",), (r, k)).astype(np.int16) + half).astype(np.uint8)
        zeros = None
        if not w.get("symmetric", True):
            name = f"{module}.weight_zero_point"
            if fmt == "pack-quantized":
                zeros = unpack_int32(np.ascontiguousarray(self._read(name, ("int32",), (_words(r, b), n_groups)).T),
                                     r, b).T
            else:
                zeros = self._shaped(name, self.ckpt.read_stored(name)[0], (r, n_groups)).astype(np.int16) + half
        g_idx = None
        if f"{module}.weight_g_idx" in self.ckpt:
            g_idx = self._read(f"{module}.weight_g_idx", ("int32", "int64"), (k,))
            if g_idx.min() < 0 or g_idx.max() >= n_groups:
                raise ConvertError(f"{self.where}: {module}.weight_g_idx names groups outside 0..{n_groups - 1}")
        return QuantizedLayer(codes, scale.astype(np.float32), zeros, g_idx, b, g, int8_inputs)

    def _shaped(self, name: str, a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        if a.shape != shape:
            raise ConvertError(f"{self.where}: tensor {name} has shape {list(a.shape)}, expected {list(shape)}")
        return a


_RULES = {rule.tensor: rule for rule in TENSOR_MAP}

FORMATS: dict[str, Callable[[dict, Checkpoint, Path], FormatReader]] = {
    "gptq": GptqReader, "awq": AwqReader, "compressed-tensors": CompressedTensorsReader,
}


# ---------------------------------------------------------------------------- import


def quant_method(src: Path) -> str | None:
    """config.json's quantization_config.quant_method of a checkpoint folder, or None."""
    try:
        config = json.loads((Path(src) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return str(q.get("quant_method")) if isinstance(q, dict) else None


def _float(name: str, a: np.ndarray, dtype: str, rank: int) -> Tensor:
    if rank == 1 or dtype == "float32":  # norms and biases in float32, as the converter stores them
        return Tensor(name, "f32", a.shape, {"data": np.ascontiguousarray(a, np.float32)})
    if dtype == "bfloat16":
        return Tensor(name, "bf16", a.shape, {"data": f32_to_bf16(a)})
    return Tensor(name, "f16", a.shape, {"data": np.ascontiguousarray(a, np.float16)})


def import_hf_quantized(src: str | Path, dst: str | Path, *, force: bool = False,
                        command: str | None = None) -> ConvertReport:
    """Write the quantized checkpoint folder `src` (GPTQ, AWQ or compressed-tensors) as the
    qbin `dst`, every quantized layer mapped without requantization."""
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists; pass --force to replace it")
    try:
        config = json.loads((src / "config.json").read_text())
        gen_path = src / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ConvertError(f"{src}: cannot read config.json ({e})") from None
    qconfig = config.get("quantization_config") or {}
    method = str(qconfig.get("quant_method"))
    if method not in FORMATS:
        raise ConvertError(f"{src}: quantization_config.quant_method {method!r} is not supported (supported: "
                           f"{', '.join(FORMATS)}); convert the unquantized release instead")
    try:
        ckpt = Checkpoint(src)
        has_head = any(n.startswith("lm_head.") for n in ckpt.names())
        args = model_args(config, gen, has_lm_head=has_head)
        tok = read_tokenizer(src)
    except (ValueError, CheckpointError) as e:
        raise ConvertError(f"{src}: {e}") from None
    arch = architecture_of(config)
    if arch.renames or arch.norm_offset or arch.splits:  # its tensors are not where, or what, _RULES reads
        raise ConvertError(f"{src}: importing {method} checkpoints of {arch.hf_name} is not supported; convert its "
                           "unquantized release (qconvert --method gptq or awq quantizes it the same way)")
    reader = FORMATS[method](qconfig, ckpt, src)
    report = ConvertReport(src, dst, "", args, [], tok.stored.nbytes, 0, 0.0, False, head="", embed="",
                           clip_search=False)
    worst = (0.0, "")
    quantized = 0
    sources = SourceFiles(src, [src / "config.json"] + ([gen_path] if gen else []) + ckpt.weight_files + tok.files)
    with QbinWriter(dst, overwrite=force) as writer:
        for entry, layer_index in T.file_order(args.n_layers, lambda e: e.present(args)):
            hf, name, role, shape = _RULES[entry].hf_name(layer_index), entry.name(layer_index), entry.role, entry.shape_of(args)
            layer = reader.layer(hf.removesuffix(".weight"), shape) if role in ("linear", "head") else None
            if layer is None:
                if hf not in ckpt:
                    raise ConvertError(f"{src}: tensor {hf} is missing (neither float nor {method}); the checkpoint "
                                       "is incomplete")
                a, dtype = ckpt.read_stored(hf)
                if tuple(a.shape) != shape or dtype not in FLOAT_DTYPES:
                    raise ConvertError(f"{src}: tensor {hf} is {dtype} of shape {list(a.shape)}; config.json gives a "
                                       f"float tensor of shape {list(shape)}")
                t, label = _float(name, a, dtype, len(shape)), dtype
            else:
                t, rounding = to_tensor(name, layer)
                if rounding > worst[0]:
                    worst = (rounding, name)
                label = f"q{layer.bits}-g{layer.group_size}" + ("-act-order" if "perm" in t.arrays else "")
                quantized += 1
            writer.add_tensor(t)
            report.tensors.append(TensorReport(name, role, shape, label, t.nbytes))
        described = reader.describe()
        sources.check_unchanged()
        provenance = Provenance(
            source=src.resolve().name, source_files=sources.sha256(),
            converter=CONVERTER, command=command or f"qformat.convert.import_hf_quantized({src.name!r}, {dst.name!r})",
            scheme="imported", method=f"{method} import: {described}", created=created_timestamp())
        writer.add_tensor(tok.stored)
        writer.finish(model=args, tokenizer=tok.info, chat_template=tok.chat_template,
                      generation=generation_defaults(gen), provenance=provenance)
    ckpt.close()
    report.scheme = f"{method} ({quantized} layers exact)"
    embed = next(r for r in report.tensors if r.role == "embed")
    report.embed = embed.scheme
    report.head = embed.scheme if args.tie_embeddings else next(r.scheme for r in report.tensors if r.role == "head")
    report.notes.append(f"{method} import: {described}; {quantized} quantized layers mapped without requantization")
    if worst[0] > 0:
        report.notes.append(f"scales rounded to float16: at most {worst[0]:.2e} relative change ({worst[1]})")
    report.file_size = dst.stat().st_size
    report.seconds = time.perf_counter() - started
    return report

