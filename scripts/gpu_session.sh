#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (device tool), after scripts/gpu_prepare.sh here. Two calls, the
# second within the machine's 30 s warm window, because the SmolLM2 file travels in two halves:
#   run(command="bash scripts/gpu_session.sh stage", carry=[".whl", ".gpu-carry/a"])
#   run(command="bash scripts/gpu_session.sh all",   carry=[".whl", ".gpu-carry/b"])
# "all" installs qformat (no network there: the image's CuPy, torch, numba + the carried
# wheels), runs the gpu-marked tests, then bench_gpu_gemv.py and bench_gpu_decode.py (with the
# SmolLM2 greedy check when the staged half is there); logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=/tmp/qformat-gpu
mkdir -p "$stage"
case "${1:-all}" in
stage)
    cp .gpu-carry/a/part "$stage/a" && ls -l "$stage"
    exit ;;
all) ;;
*) echo "usage: gpu_session.sh stage|all" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log"
python3 bench/bench_gpu_gemv.py 2>&1 | tee "$OUT/bench-gemv.log"
greedy=()
if [ -f "$stage/a" ] && [ -f .gpu-carry/b/part ]; then
    cat "$stage/a" .gpu-carry/b/part > "$stage/smollm2-int4-g64.qbin"
    greedy=(--greedy-check "$stage/smollm2-int4-g64.qbin")
fi
python3 bench/bench_gpu_decode.py "${greedy[@]}" 2>&1 | tee "$OUT/bench-decode.log"
