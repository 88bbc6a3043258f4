#!/usr/bin/env bash
# Install activelab and run the quickstart experiment (8x8 digits, no download), then print the report
# and write the learning-curve figure to runs/quickstart/figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(bash scripts/setup.sh | tail -n 1)"
"$venv/bin/activelab" run configs/quickstart.yaml --out runs/quickstart --workers 2
"$venv/bin/activelab" report runs/quickstart
"$venv/bin/activelab" plot runs/quickstart
