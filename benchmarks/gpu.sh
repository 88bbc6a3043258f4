#!/usr/bin/env bash
# The speed benchmarks on CUDA, sized to fit about 8 minutes on one modern GPU; tables go to
# benchmarks/results/gpu/. Usage: bash benchmarks/gpu.sh [cuda:N]   (run from the repository root)
set -euo pipefail
DEVICE="${1:-cuda}"
OUT=benchmarks/results/gpu
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device here')"
"$PY" -c "import torch; print(torch.cuda.get_device_name(0), torch.version.cuda)" | tee "$OUT/device.txt"
run() {  # run NAME SECONDS CMD...: one step with its own time limit, so one slow step cannot eat the others
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  if ! timeout "$limit" "$@"; then echo "$name: failed or over ${limit}s" | tee -a "$OUT/failures.txt"; fi
}
run forward    60  "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --section forward --n 500000
run mc         90  "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --section mc --mc-n 100000
run gradnorm   60  "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --section gradnorm --grad-n 5000
run strategies 90  "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --section strategies --strategy-n 100000
# every strategy on a 1,000,000-sample pool, on the device (each in its own process; K = 128 MC passes)
run million    180 "$PY" benchmarks/bench_million.py --device "$DEVICE" --timeout 120 --limit-gb 8 \
  --strategies margin,entropy,var_ratio,bald,coreset,kcenter,badge,gradnorm,bait,fishermask \
  --out "$OUT/bench_million.txt"
echo "tables in $OUT"
