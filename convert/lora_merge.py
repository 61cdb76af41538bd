"""`qconvert --merge-lora ADAPTER_DIR`: a peft LoRA adapter folded into the float weights as they
are read, so that the quantizers see W + (alpha / r) * B @ A (rsLoRA: alpha / sqrt(r))."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import Checkpoint, CheckpointError
from .plan import ConvertError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def merge_lora(ckpt: Checkpoint, folder: str | Path) -> dict[str, Path]:
    """Register the adapter of `folder` with `ckpt` (Checkpoint.add_lora per adapted weight);
    returns its files by the names the provenance records them under (lora/<file>)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ConvertError(f"{folder}: not a peft LoRA adapter (it needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((folder / CONFIG).read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{folder / CONFIG}: not a LoRA config ({type(e).__name__}: {e})") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ConvertError(f"{folder}: a {config.get('peft_type')} adapter{' with DoRA' if config.get('use_dora') else ''};"
                           " --merge-lora merges plain LoRA")
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors raises its own types on a damaged file
        raise ConvertError(f"{folder / WEIGHTS}: cannot read it ({e})") from None
    modules = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in weights if ".lora_A." in k})
    if not modules:
        raise ConvertError(f"{folder / WEIGHTS}: no lora_A weights")
    for module in modules:
        a, b = weights.get(f"{PREFIX}{module}.lora_A.weight"), weights.get(f"{PREFIX}{module}.lora_B.weight")
        if a is None or b is None:
            raise ConvertError(f"{folder / WEIGHTS}: {module} has lora_A without lora_B (or the other way round)")
        try:
            ckpt.add_lora(f"{module}.weight", a, b, scale)
        except CheckpointError as e:
            raise ConvertError(str(e)) from None
    return {f"lora/{CONFIG}": folder / CONFIG, f"lora/{WEIGHTS}": folder / WEIGHTS}
