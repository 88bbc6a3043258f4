#!/usr/bin/env bash
# Re-make a results page's tables and figures from its experiment directory.
# Usage: docs/build.sh RUN_DIR DOC_DIR [extra `activelab plot` options...]
# e.g.   docs/build.sh runs/lplgrad_fashion_mnist docs/lplgrad_fashion_mnist --highlight lplgrad
set -euo pipefail
run_dir="$1"; doc_dir="$2"; shift 2
mkdir -p "$doc_dir/figures"
activelab report "$run_dir" > "$doc_dir/report.txt"
activelab report "$run_dir" --json > "$doc_dir/report.json"
activelab plot "$run_dir" --out "$doc_dir/figures" "$@"
