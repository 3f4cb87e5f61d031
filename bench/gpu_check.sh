#!/usr/bin/env bash
# One-shot accelerator check of jaxnorm (issue 14): bench/gpu_check.py under a time budget, one JSON
# ($OUT/gpu_check.json) plus its log. For a session lent a GPU through the `device` tool (15 minutes of
# device time in all, start-up included): run it once, early, as one command, then give the machine back.
#
# Prepare, here, from the repository root (nothing is installed there: the GPU image has Python 3.12 with
# jax, flax, optax, orbax, pandas and torch; the dataset travels as its four IDX files in an ignored folder):
#   mkdir -p .gpu/data/fashion_mnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu/data/fashion_mnist/
#   grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
# Then: device run, carry [".gpu"], timeout_s 540, command:  bash bench/gpu_check.sh
# Here, on the CPU (tiny sizes; what the test suite runs so that this script cannot rot):  make gpu-check
set -u -o pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
export OUT=${OUT:-/tmp/gpu_check_out} PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAXNORM_DATA_DIR=${JAXNORM_DATA_DIR:-$root/.gpu/data}
[ -d "$JAXNORM_DATA_DIR" ] || unset JAXNORM_DATA_DIR   # then jaxnorm.data's defaults (Debian's package here)
mkdir -p "$OUT"
PY=${PY:-python3}
{ date; nvidia-smi 2>&1 | head -15; } > "$OUT/env.txt" 2>&1
# 450 s of steps leave room for start-up and the transfers inside the 8 minutes the issue allows.
"$PY" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
