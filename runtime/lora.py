"""LoRA adapters at run time: a folder in peft's layout (adapter_config.json and
adapter_model.safetensors under the Hugging Face module names: what qtune writes, and what peft
saves from a float model) added beside the projections it adapts,

    y = W x + s · B (A x),   s = scale · lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora),

with A (r, in) and B (out, r). The base weights stay quantized in the memory map; the adapter's
float32 matrices run beside each projection's op (qformat.kernels.lora_op: the CPU's own kernel,
in the fused decode step too, or CuPy's products), so no torch is needed. Only plain LoRA on the
decoder's projections is taken: DoRA, trained biases, fully saved modules or a module this file
does not have are refused by name, never silently dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qformat import tensors as T
from qformat.errors import QbinError
from qformat.reader import QbinReader
from qformat.schemes import bf16_to_f32

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft's PeftModel puts before the base model's module names
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


@dataclass(frozen=True)
class LoraPair:
    """One adapted projection: A (r, in) and B (out, r), float32, B already times s."""

    a: np.ndarray
    b: np.ndarray


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 (bf16 widened exactly)."""
    import safetensors

    try:
        entries = safetensors.deserialize(path.read_bytes())
    except Exception as e:  # the library's own error type differs across versions
        raise QbinError(path, f"not a safetensors file ({e}); re-save the adapter") from None
    out = {}
    for name, entry in entries:
        raw, dtype = bytes(entry["data"]), entry["dtype"]
        if dtype == "BF16":
            values = bf16_to_f32(np.frombuffer(raw, np.uint16))
        elif dtype in _DTYPES:
            values = np.frombuffer(raw, _DTYPES[dtype]).astype(np.float32)
        else:
            raise QbinError(path, f"tensor {name} is {dtype}; an adapter holds float tensors")
        out[name] = values.reshape(entry["shape"])
    return out


def _config(folder: Path) -> dict:
    path = folder / CONFIG
    if not folder.is_dir():
        raise QbinError(folder, "no such adapter folder; give the folder qtune -o (or peft's save_pretrained) wrote")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QbinError(folder, f"no {CONFIG}: not an adapter folder in peft's layout") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QbinError(path, f"not JSON ({e})") from None
    if not isinstance(config, dict):
        raise QbinError(path, "an adapter config is a JSON object")
    refused = {
        "peft_type": (config.get("peft_type", "LORA") != "LORA", "is not LORA; only LoRA adapters run"),
        "use_dora": (bool(config.get("use_dora")), "DoRA adapters do not run here; train plain LoRA"),
        "bias": (config.get("bias", "none") != "none", "trained biases do not run here; train with bias='none'"),
        "modules_to_save": (bool(config.get("modules_to_save")),
                            "fully trained modules do not run here; merge them with qconvert --merge-lora"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")), "is for GPT-2's Conv1D layers, which no qbin has"),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise QbinError(path, f"{key} {config.get(key)!r} {why}" if key == "peft_type" else f"{key}: {why}")
    return config


def _scale_of(config: dict, module: str, rank: int) -> float:
    """lora_alpha / r (or / sqrt(r)) for one module, honouring peft's per-module alpha_pattern."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):  # peft's rule: a regex matching the name's end
            alpha = float(value)
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def read_adapter(folder: str | Path, reader: QbinReader, scale: float = 1.0) -> dict[str, LoraPair]:
    """The adapter in `folder` as {qbin tensor name: LoraPair} for the model of `reader`, its
    product times `scale` (1: as trained). QbinError naming the problem for a folder that is not
    a peft LoRA adapter, a module the file has no projection for, or a shape that is not the
    projection's."""
    folder = Path(folder)
    args = reader.model
    config = _config(folder)
    if args.moe:  # its experts run as rows of stacked tensors, which no HF module names
        raise QbinError(folder, "adapters on a mixture of experts do not run here; merge it with qconvert --merge-lora")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise QbinError(folder, f"no {WEIGHTS} (an adapter saved as .bin is torch's pickle; re-save it with "
                                "safe_serialization=True)")
    tensors = _read_safetensors(weights)
    modules, shapes = {}, {}  # HF module -> qbin tensor, and its (out, in), of every projection the file has
    for entry, layer in T.file_order(args.n_layers, lambda t: t.role == "linear"):
        name = entry.name(layer)
        if name in reader:
            modules[T.HF_NAMES[entry].format(i=layer).removesuffix(".weight")] = name
            shapes[name] = tuple(reader[name].shape)
    pairs: dict[str, LoraPair] = {}
    for key in tensors:
        module, part = _split_key(key)
        if part is None or module not in modules:
            raise QbinError(weights, f"{key} adapts no projection of this model (the adapter's targets must be its "
                                     "q/k/v/o/gate/up/down projections; was it trained on another model?)")
        other = "lora_B" if part == "lora_A" else "lora_A"
        if f"{PREFIX}{module}.{other}.weight" not in tensors:
            raise QbinError(weights, f"{key} has no {other} beside it; the file is incomplete")
    for key, a in tensors.items():
        module, part = _split_key(key)
        if part != "lora_A":
            continue
        b = tensors[f"{PREFIX}{module}.lora_B.weight"]
        name = modules[module]
        out_features, in_features = shapes[name]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
            raise QbinError(weights, f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the "
                                     f"projection ({out_features}, {in_features}) with one rank; the adapter was "
                                     "trained on another model")
        s = scale * _scale_of(config, module, rank)
        pairs[name] = LoraPair(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b * np.float32(s)))
    if not pairs:
        raise QbinError(weights, "holds no LoRA weights")
    return pairs


def _split_key(key: str) -> tuple[str, str | None]:
    """(HF module, "lora_A" or "lora_B") of a peft weight name; part None for anything else.
    peft names a weight with its adapter's name too (q_proj.lora_A.default.weight) in memory
    only, never in a saved file."""
    body = key.removeprefix(PREFIX)
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if key.startswith(PREFIX) and body.endswith(suffix):
            return body.removesuffix(suffix), part
    return body, None
