#!/usr/bin/env bash
# Install activelab with its test dependencies and run the test suite.
# Fashion-MNIST (Debian's dataset-fashion-mnist) is installed when we are root and apt-get exists, so the
# tests that read the real files run; without it they are skipped. Likewise Debian's chromium for the
# labeling page's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
        || echo "note: could not install dataset-fashion-mnist; its tests will be skipped"
fi
# Debian's chromium (and its driver) for the labeling page's browser test; without it that test is skipped.
# The test never downloads a browser.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
        || echo "note: could not install chromium; the browser test will be skipped"
fi
venv="$(bash scripts/setup.sh test | tail -n 1)"
"$venv/bin/ruff" check activelab tests benchmarks
"$venv/bin/ruff" format --check activelab tests benchmarks
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
