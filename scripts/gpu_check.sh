#!/usr/bin/env bash
# GPU check of every KV policy on a random-weight Llama-3-8B-shaped model (nothing downloaded):
# output agreement with transformers at 16K tokens, then prefill/decode timing at 32K/64K/128K
# against transformers generate. Time-boxed to stay under 8 minutes on one H100/H200.
#
#   scripts/gpu_check.sh [--budget-s 420] [--lengths 32K,64K,128K] [...]   (see evals/bench/gpu_check.py)
#
# Results go to $OUT if set, else docs/results/gpu/. Works from a plain checkout: if the kvmux
# package is not installed, it is imported from the source tree. Wheels placed in .whl/ (e.g. a
# newer transformers, pydantic) are installed into a temporary folder first, for GPU boxes
# without network access.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-docs/results/gpu}"
mkdir -p "$OUT_DIR"

if compgen -G ".whl/*.whl" >/dev/null; then
  SITE="$(mktemp -d)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
source scripts/kvmux_path.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
set -o pipefail
timeout --signal=INT 470 "$PY" -P -m kvmux.evals.bench.gpu_check --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
