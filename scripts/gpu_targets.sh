#!/usr/bin/env bash
# Attention-level CUDA targets of the sparse policies, one short run (about 5 minutes on one H100):
#   - HiP: Triton and PyTorch kernels vs dense SDPA, decode step at 128K and prefill at 64K
#     (scripts/hip_kernels.py, after an 8K agreement check of the two kernel families; then
#     each Triton kernel alone under a few launch settings: scoring chunk, keys per step, warps);
#   - FlexPrefill: selection + block-sparse flex kernel vs dense SDPA at 64K and 128K
#     (scripts/flexprefill_kernels.py).
# Llama-3-8B attention shape (32/8 heads x 128), bf16, random inputs; nothing downloaded.
#
#   scripts/gpu_targets.sh            results in $OUT if set, else docs/results/gpu/
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-docs/results/gpu}"
mkdir -p "$OUT_DIR"
source scripts/kvmux_path.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1
status=0
timeout --signal=INT 240 "$PY" -P scripts/hip_kernels.py 2> >(tee "$OUT_DIR/hip_kernels.log" >&2) \
  | tee "$OUT_DIR/hip_kernels.json" || status=$?
timeout --signal=INT 150 "$PY" -P scripts/flexprefill_kernels.py --lengths 64K,128K \
  --json "$OUT_DIR/flexprefill_kernels.json" 2>&1 | tee "$OUT_DIR/flexprefill_kernels.log" || status=$?
exit "$status"
