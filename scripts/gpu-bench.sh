#!/usr/bin/env bash
# make bench's gpu section on a GPU machine, in one go (poisonbench.bench.gpu_speed):
# the job path's ResNet-18 epoch beside a plain loop, K = 1, 2, 4, 8 workers on the
# device, crafting in fp32 and bf16.
#
#   scripts/gpu-bench.sh                  # writes $OUT/gpu-bench.txt (OUT defaults to ./gpu-bench-out)
#   LIMIT_S=300 PYTHON=.venv/bin/python scripts/gpu-bench.sh
#   INSTALL=0 scripts/gpu-bench.sh        # no pip install: run from the tree as it is
#
# Expects a Python with torch (CUDA), lightning and poisonbench's other dependencies;
# installs poisonbench itself without touching them (pip install --no-deps -e .). The
# section stops after LIMIT_S seconds (default 450) and prints as it goes, so whatever
# was measured by then is in the file. The exit status is the section's.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-bench-out}
PY=${PYTHON:-python}
LIMIT_S=${LIMIT_S:-450}
mkdir -p "$OUT"
REPORT="$OUT/gpu-bench.txt"

[ "${INSTALL:-1}" = 0 ] || "$PY" -m pip install --no-deps --no-build-isolation -q -e . >"$OUT/pip.txt" 2>&1 \
    || echo "gpu-bench: pip install --no-deps -e . failed (see $OUT/pip.txt); running from the tree" >&2
{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/nvidia-smi: /'
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
        timeout "$LIMIT_S" "$PY" -m poisonbench.bench.speed --only gpu --device cuda
    status=$?
    [ "$status" = 124 ] && echo "gpu-bench: stopped after the ${LIMIT_S} s limit"
    echo "gpu-bench: exit status $status"
    exit "$status"
} 2>&1 | tee "$REPORT"
status=${PIPESTATUS[0]}
echo "gpu-bench: written to $REPORT" >&2
exit "$status"
