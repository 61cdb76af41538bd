#!/usr/bin/env bash
# Creates .venv (once) and installs qformat into it, editable, with the extras named as arguments,
# then compiles the CPU kernels of the common schemes for this CPU (python -m qformat.runtime.warm:
# about 35 s once on 2 cores, so the first qrun starts in about a second instead of 13).
# torch is pinned to the CPU build first: a looser requirement would pull multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-convert}"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
.venv/bin/python -m qformat.runtime.warm
