#!/usr/bin/env bash
# Installs qformat with its test dependencies into .venv and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh convert,test
exec .venv/bin/python -m pytest -q "$@"
