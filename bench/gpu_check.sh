#!/usr/bin/env bash
# GPU check (issue 12): runs every GPU path this machine has through `cxr-edge verify` and the bench,
# and writes a report folder. Meant for an NVIDIA machine whose Python has torch (>= 2.9) but maybe
# not TensorRT or onnxruntime-gpu, possibly without internet and without `pip install -e .`.
#
#   bench/gpu_check.sh [OUT_DIR] [MODEL_PKG]
#
#   OUT_DIR    report folder (default: gpu-check-<host>-<UTC time>); holds env.txt, verify-*.json /
#              .txt, bench/ (report.md, report.json), pytest.txt, summary.md
#   MODEL_PKG  model package (default: the embedded default model, cxr_edge/models/default.cxrpkg)
#   PYTHON     interpreter to use (default: python3)
#   GPU_CHECK_BUDGET_S  wall-clock budget in seconds (default 450: finishes in under 8 minutes)
#
# Paths that run: torch CUDA fp32 / fp16 / bf16 always (bf16 where the GPU has it), TensorRT fp32 /
# fp16 / int8 when `tensorrt` and cuda-python import, ONNX Runtime CUDA fp32 / int8 when its CUDA
# provider is there. Each is verified on the package's reference set against the torch fp32
# probabilities stored with it (formats.TOLERANCES) and timed. Exit status: 0 all measured paths
# passed, 1 a path failed verification, 2 setup problem (no cxr_edge importable, no GPU).
set -u
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-gpu-check-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ)}
MODEL=${2:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export CXR_EDGE_CACHE="$OUT/cache"          # engines and verdicts of this run stay in the report
cd "$REPO"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step_timeout() {  # seconds for the next step: its own limit, capped by what the budget has left
  local want=$1 l; l=$(left); (( l < 5 )) && { echo 0; return; }
  (( want < l )) && echo "$want" || echo "$l"
}
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.md"; }

# -- make cxr_edge importable without installing it -------------------------------------------------
if ! "$PY" -c "import cxr_edge.cli, cxr_edge.bench.core" >/dev/null 2>&1; then
  # pyproject maps train/, export/, bench/ into the package (cxr_edge.train, ...): rebuild that layout
  # out of symlinks and put it first on PYTHONPATH.
  SHIM="$OUT/.pythonpath"
  rm -rf "$SHIM"; mkdir -p "$SHIM/cxr_edge"
  for f in "$REPO"/cxr_edge/* ; do ln -s "$f" "$SHIM/cxr_edge/$(basename "$f")"; done
  for sub in train export bench; do ln -s "$REPO/$sub" "$SHIM/cxr_edge/$sub"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  log "cxr_edge not installed: using PYTHONPATH=$SHIM (symlinked package layout)"
fi
if ! "$PY" -c "import cxr_edge.cli" 2>"$OUT/import-error.txt"; then
  log "FATAL: cannot import cxr_edge with $PY: $(tail -1 "$OUT/import-error.txt")"
  log "install the runtime dependencies (pip install numpy pillow pydicom ...; see pyproject.toml) and rerun"
  exit 2
fi
CLI=("$PY" -m cxr_edge.cli)

# -- environment ---------------------------------------------------------------------------------
{
  echo "date: $(date -u)"; echo "host: $(hostname)"; echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for mod in ("torch", "tensorrt", "onnxruntime", "openvino", "cuda.bindings", "onnx", "numpy"):
    try:
        m = importlib.import_module(mod)
        extra = ""
        if mod == "torch":
            extra = f" cuda {m.version.cuda} available {m.cuda.is_available()}"
            if m.cuda.is_available():
                extra += f" {m.cuda.get_device_name(0)} sm{m.cuda.get_device_capability(0)} bf16 {m.cuda.is_bf16_supported()}"
        if mod == "onnxruntime":
            extra = f" providers {m.get_available_providers()}"
        print(mod, getattr(m, "__version__", "?") + extra)
    except Exception as e:
        print(mod, "not importable:", type(e).__name__, e)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
MODEL_ARGS=()
[[ -n "$MODEL" ]] && MODEL_ARGS=(--model "$MODEL")

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "FATAL: torch.cuda.is_available() is False: no usable NVIDIA GPU for this Python"
  exit 2
fi

FAILED=0
run_verify() {  # name, timeout, args...
  local name=$1 want=$2; shift 2
  local t; t=$(step_timeout "$want")
  if (( t < 10 )); then log "$name: SKIPPED (time budget spent)"; return; fi
  log "$name: cxr-edge verify $* (timeout ${t}s)"
  timeout "$t" "${CLI[@]}" verify "${MODEL_ARGS[@]}" "$@" --json > "$OUT/verify-$name.json" 2> "$OUT/verify-$name.err"
  local rc=$?
  "${CLI[@]}" verify "${MODEL_ARGS[@]}" "$@" > "$OUT/verify-$name.txt" 2>&1 || true   # table from the cache: fast
  case $rc in
    0) log "$name: passed" ;;
    1) log "$name: FAILED verification (see verify-$name.txt)"; FAILED=1 ;;
    124) log "$name: TIMED OUT after ${t}s"; FAILED=1 ;;
    *) log "$name: error rc=$rc: $(tail -1 "$OUT/verify-$name.err")"; FAILED=1 ;;
  esac
  sed 's/^/    /' "$OUT/verify-$name.txt" | tee -a "$OUT/summary.md" >/dev/null
}

# -- verify every GPU path -------------------------------------------------------------------------
run_verify torch-cuda-fp32 90 --backend torch --precision fp32 --device cuda
run_verify torch-cuda-fp16 90 --backend torch --precision fp16
run_verify torch-cuda-bf16 90 --backend torch --precision bf16
if "$PY" -c "import tensorrt, cuda.bindings.runtime" 2>/dev/null; then
  run_verify tensorrt 300 --backend tensorrt          # builds fp32/fp16/int8 engines on first use
else
  log "tensorrt: not installed here (needs tensorrt >= 10 and cuda-python): written, not run"
fi
if "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null; then
  run_verify onnxruntime-cuda 120 --backend onnxruntime --device cuda
else
  log "onnxruntime CUDA: provider not installed here (onnxruntime-gpu): written, not run"
fi

# -- auto's choice and the bench -------------------------------------------------------------------
t=$(step_timeout 30)
(( t >= 5 )) && timeout "$t" "${CLI[@]}" info "${MODEL_ARGS[@]}" > "$OUT/info.txt" 2>&1
log "info: $(grep '^auto' "$OUT/info.txt" 2>/dev/null || echo 'not run')"
t=$(step_timeout 150)
if (( t >= 30 )); then
  BACKENDS=(torch)
  "$PY" -c "import tensorrt" 2>/dev/null && BACKENDS+=(tensorrt)
  "$PY" -c "import onnxruntime" 2>/dev/null && BACKENDS+=(onnxruntime)
  log "bench: ${BACKENDS[*]} (timeout ${t}s)"
  timeout "$t" "${CLI[@]}" bench "${MODEL_ARGS[@]}" --data "$REPO/samples" --quick --backends "${BACKENDS[@]}" \
      --timeout 100 --out "$OUT/bench" > "$OUT/bench.txt" 2>&1 || log "bench: failed or timed out (see bench.txt)"
  [[ -f "$OUT/bench/report.md" ]] && log "bench: report in bench/report.md"
else
  log "bench: SKIPPED (time budget spent)"
fi

# -- the GPU-marked tests ------------------------------------------------------------------------------
t=$(step_timeout 60)
if (( t >= 20 )) && "$PY" -c "import pytest" 2>/dev/null; then
  timeout "$t" "$PY" -m pytest -q -x tests/test_verify.py -k "gpu or tensorrt or cuda" > "$OUT/pytest.txt" 2>&1
  log "pytest (GPU tests): $(tail -1 "$OUT/pytest.txt")"
fi

log "done in $(( $(date +%s) - START ))s; report folder $OUT; exit $FAILED"
exit $FAILED
