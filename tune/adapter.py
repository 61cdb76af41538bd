"""LoRA adapters in peft's layout: adapter_config.json (peft's LoraConfig) and
adapter_model.safetensors under the Hugging Face module names, so that peft loads an adapter
trained on a qbin base onto the float model (PeftModel.from_pretrained) and the other way round."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from qformat.convert.architectures import ARCHITECTURES, tensor_rules

from .model import QuantDecoder

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft's PeftModel puts before the base model's module names


def _architecture(args):
    arch = next((a for a in ARCHITECTURES.values() if a.arch == args.arch), None)
    if arch is None:
        raise ValueError(f"architecture {args.arch!r} has no Hugging Face module names")
    return arch


def hf_modules(model: QuantDecoder) -> dict[str, str]:
    """Adapted tensor (layers.{i}.<key>) -> the Hugging Face module it adapts. ValueError for an
    architecture whose projections are not one module each in transformers (Phi-3's fused
    qkv_proj and gate_up_proj are split in the file)."""
    args = model.args
    arch = _architecture(args)
    names = {qbin: hf for hf, qbin, _ in tensor_rules(arch, args.n_layers)}
    fused = {part for layer in range(args.n_layers) for _, parts in arch.split_parts(args, layer) for part, _ in parts}
    out = {}
    for name in model.adapters():
        hf = names[name]
        if hf in fused:
            raise ValueError(f"{name} is part of a fused module in transformers ({arch.hf_name}); peft cannot "
                             "adapt it alone")
        out[name] = hf.removesuffix(".weight")
    return out


def dequantized_state(reader) -> dict[str, torch.Tensor]:
    """{Hugging Face name: float32 tensor} of every weight of the qbin file, dequantized: loaded
    into the float transformers model (load_state_dict(..., strict=False)), it makes peft run on
    exactly the base qtune trained on. ValueError for an architecture without HF names or with
    fused HF tensors (Phi-3)."""
    args = reader.model
    arch = _architecture(args)
    if arch.splits:
        raise ValueError(f"{arch.hf_name} fuses tensors the file splits; its weights have no one-to-one HF names")
    return {hf: torch.from_numpy(reader[name].dequantize().copy())
            for hf, name, _ in tensor_rules(arch, args.n_layers) if name in reader}


def load_dequantized(hf_model, reader) -> None:
    """Replace the transformers model's weights by the qbin file's dequantized ones (ties the head
    again when the embeddings are tied): peft on it runs on exactly the base qtune trained on."""
    hf_model.load_state_dict(dequantized_state(reader), strict=False)
    if hf_model.config.tie_word_embeddings:
        hf_model.tie_weights()


def save_adapter(model: QuantDecoder, folder: str | Path, base_model: str = "", *, force: bool = False) -> Path:
    """Write the model's adapters to `folder` in peft's layout; the folder appears only when
    complete (written beside it, then renamed)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not force:
        raise FileExistsError(f"{folder}: already exists; pass force=True (--force) to replace it")
    modules = hf_modules(model)
    adapters = model.adapters()
    first = next(iter(adapters.values()))
    config = LoraConfig(r=first.rank, lora_alpha=first.alpha, lora_dropout=first.dropout_p, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model or None,
                        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules.values()}))
    tensors = {}
    for name, lora in adapters.items():
        for part in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}{modules[name]}.{part}.weight"] = getattr(lora, part).weight.detach().float().contiguous()
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config.save_pretrained(str(scratch))
        save_file(tensors, str(scratch / WEIGHTS), metadata={"format": "pt"})
        if folder.exists():
            shutil.rmtree(folder)
        scratch.rename(folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return folder


def load_adapter(model: QuantDecoder, folder: str | Path) -> None:
    """Load peft-layout adapter weights from `folder` into the model's LoRA modules (same rank)."""
    from safetensors.torch import load_file

    loaded = load_file(str(Path(folder) / WEIGHTS))
    modules = hf_modules(model)
    with torch.no_grad():
        for name, lora in model.adapters().items():
            for part in ("lora_A", "lora_B"):
                key = f"{PREFIX}{modules[name]}.{part}.weight"
                if key not in loaded:
                    raise ValueError(f"{folder}: no {key} in {WEIGHTS}; was the adapter trained on other targets?")
                getattr(lora, part).weight.copy_(loaded[key])
