#!/usr/bin/env bash
# Paper experiments at their published input sizes on one NVIDIA GPU (H100/H200), in < ~8 minutes.
#
#   # on the machine with the data (once; 29 MB of 256 px JPEG shards, never committed):
#   python -m cxr_edge.train.shards build --data ../shared/data/cxr --out runs/shards/cxr256
#   # on the GPU machine (torch >= 2.9 with CUDA, this repository installed: pip install -e ".[workbench]"):
#   train/gpu_reproduce.sh runs/shards/cxr256 runs/gpu          # -> runs/gpu/summary.md, runs/gpu/runs/*/report.md
#   TINY=1 train/gpu_reproduce.sh runs/shards/cxr256 runs/tiny  # the same path on a CPU: 4 experiments, 64 px, 1 epoch
#
# Env: PARALLEL (experiments at once, default 4), WORKERS (DataLoader workers each, default 3),
#      BUDGET_S (stop what still runs after this, default 450 s), DATA_DIR (where shards unpack).
set -euo pipefail
SHARDS=${1:?usage: train/gpu_reproduce.sh SHARD_DIR OUT_DIR}
OUT=${2:?usage: train/gpu_reproduce.sh SHARD_DIR OUT_DIR}
DATA_DIR=${DATA_DIR:-${TMPDIR:-/tmp}/cxr-shards-data}
PY=${PYTHON:-python}

if [ -z "${TINY:-}" ]; then
  "$PY" - <<'PYEOF'
import sys, torch
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if v < (2, 9):
    sys.exit(f"torch {torch.__version__}: this script needs torch >= 2.9")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: run with TINY=1 for the CPU check")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PYEOF
fi
start=$(date +%s)
rm -rf "$DATA_DIR"
"$PY" -m cxr_edge.train.shards unpack "$SHARDS" "$DATA_DIR"
echo "unpacked in $(( $(date +%s) - start )) s"
args=(--data "$DATA_DIR" --out "$OUT" --parallel "${PARALLEL:-4}" --workers "${WORKERS:-3}" --budget-s "${BUDGET_S:-450}")
[ -n "${TINY:-}" ] && args+=(--tiny)
"$PY" -m cxr_edge.train.gpu_reproduce "${args[@]}"
echo "total $(( $(date +%s) - start )) s; summary: $OUT/summary.md"
