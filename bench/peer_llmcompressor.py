"""Write a peer's quantized folder: llm-compressor's GPTQ (W4A16, groups of 64) on the CPU.

    VENV/bin/python bench/peer_llmcompressor.py MODEL_DIR OUT_DIR [--asym] [--samples 64]

llm-compressor pins an older transformers than qformat's test extra, so run this with a separate
environment (python -m venv VENV; VENV/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1);
it imports nothing from qformat. Calibration: `--samples` windows of 512 tokens from the second
half of the EVAL.md pydoc token stream (never the evaluated windows). Then
`python bench/bench_hf_export.py --peer OUT_DIR` imports the folder and scores it.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--asym", action="store_true", help="asymmetric groups (zero-points)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--group", type=int, default=64)
    args = ap.parse_args()

    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    ids = tok(pydoc_text(), add_special_tokens=False)["input_ids"]
    half = ids[len(ids) // 2:]
    windows = [half[i * 512:(i + 1) * 512] for i in range(args.samples)]
    data = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * 512 for _ in windows]})
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    weights = {"num_bits": 4, "type": "int", "symmetric": not args.asym, "strategy": "group",
               "group_size": args.group, "actorder": "weight"}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"], dampening_frac=0.01)
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=512, num_calibration_samples=len(windows))
    print(f"llm-compressor GPTQ: {time.perf_counter() - started:.0f} s")
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (args.model / extra).is_file() and not (args.out / extra).exists():
            shutil.copy(args.model / extra, args.out / extra)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
