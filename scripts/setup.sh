#!/usr/bin/env bash
# Create (or reuse) the virtualenv outside the repository and install activelab into it.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh test
# ACTIVELAB_VENV chooses the virtualenv (default ~/.venvs/activelab).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ACTIVELAB_VENV:-$HOME/.venvs/activelab}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
# PyTorch first, pinned: on our machines these wheels lie on local disk; elsewhere pip fetches them.
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
    "$py" -m pip install -q ${ACTIVELAB_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
spec="$repo"
[ -n "$extras" ] && spec="$repo[$extras]"
log="$(mktemp)"
if ! "$py" -m pip install -q -e "$spec" >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
grep -v "^WARNING: Location" "$log" >&2 || true
rm -f "$log"
"$py" -c "import activelab, sklearn, pydantic, click, matplotlib"  # fail loudly if the install did not work
echo "$venv"
