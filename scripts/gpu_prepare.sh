#!/usr/bin/env bash
# Run HERE (no GPU needed) before a session that has the device tool: stages what the device
# machine lacks in git-ignored folders the device call carries (see scripts/gpu_session.sh).
#   .whl/         wheels missing from the device image (xxhash; CuPy, torch, numba are there)
#   .gpu-carry/a  .gpu-carry/b   SmolLM2-135M int4-g64 (embeddings and head int4 too) split in
#                 two halves: 77 MB is over one call's 64 MiB, so two back-to-back calls carry it
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
for d in /.whl/ /.gpu-carry/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
mkdir -p .whl .gpu-carry/a .gpu-carry/b
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "xxhash==$(.venv/bin/python -c 'import xxhash; print(xxhash.VERSION)')"
model="${QFORMAT_SMOLLM2:-$HOME/.cache/qformat/smollm2}"
if [ ! -f "$model/config.json" ]; then
    .venv/bin/python -m qformat.convert.demo "$model"
fi
qbin=.gpu-carry/smollm2-int4-g64.qbin
[ -f "$qbin" ] || .venv/bin/qconvert "$model" "$qbin" --scheme int4-g64 --embed scheme --head scheme --force
half=$(( $(stat -c %s "$qbin") / 2 ))
head -c "$half" "$qbin" > .gpu-carry/a/part
tail -c +$(( half + 1 )) "$qbin" > .gpu-carry/b/part
rm "$qbin"
du -sh .whl .gpu-carry/a .gpu-carry/b
