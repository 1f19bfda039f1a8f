#!/usr/bin/env bash
# Fast-core rows on a GPU, one short run (about 3 minutes on one H200): kvmux `full` against
# transformers `generate` and its static cache on a random-weight Llama-3-8B-shaped model (bf16,
# nothing downloaded) at 4K (the HBM roofline column) and 32K (TTFT and decode ratios), 3 measured
# rounds after a warm-up; then a decode profile of `full` and `generate` at 4K.
#
#   scripts/gpu_fastcore.sh            results in $OUT if set, else docs/results/gpu/fastcore/
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-docs/results/gpu}/fastcore"
mkdir -p "$OUT_DIR"
source scripts/kvmux_path.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
timeout --signal=INT 150 "$PY" -P -m kvmux.evals.bench.cli --shape llama3-8b --device cuda --presets full \
  --lengths 4K,32K --new-tokens 64 --repeats 3 --warmup 1 --peers generate_static --out "$OUT_DIR" \
  2>&1 | tee "$OUT_DIR/bench.log" || status=$?
timeout --signal=INT 60 "$PY" -P -m kvmux.evals.bench.cli --shape llama3-8b --device cuda --presets full \
  --lengths 4K --profile-decode 16 --out "$OUT_DIR/profile" 2>&1 | tee "$OUT_DIR/profile.log" || status=$?
exit "$status"
