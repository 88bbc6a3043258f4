"""Run one experiment config with two revisions of activelab and compare every round's picks and predictions.

Command (how the data-plane refactor was checked to leave results unchanged)::

    python benchmarks/compare_revisions.py benchmarks/configs/equivalence.yaml --before 8f1fc1d

Each revision runs in a child process (the old one from a temporary git worktree) into its own directory; the
script prints, per strategy and round, whether the selected indices and the test predictions are identical.
Exit status 1 if any differ.
"""

from __future__ import annotations

import argparse
import io
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def rounds(store: Path) -> dict:
    conn = sqlite3.connect(store)
    out = {}
    for strategy, rnd, sel, preds in conn.execute("SELECT strategy, round, selected, test_predictions FROM rounds"):
        out[(strategy, rnd)] = (np.load(io.BytesIO(sel)), np.load(io.BytesIO(preds)))
    conn.close()
    return out


def run(config: Path, source: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "activelab.cli", "run", str(config), "--out", str(out), "--quiet"]
    subprocess.run(cmd, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--before", required=True, help="the older git revision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wt = tmp / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), args.before], check=True)
        try:
            run(args.config.resolve(), wt, tmp / "old")
            run(args.config.resolve(), REPO, tmp / "new")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=False)
        old, new = rounds(tmp / "old" / "results.sqlite"), rounds(tmp / "new" / "results.sqlite")
    differ = 0
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            print(f"{key}: only in {'new' if key in new else 'old'}")
            differ += 1
            continue
        same_sel = np.array_equal(old[key][0], new[key][0])
        same_pred = np.array_equal(old[key][1], new[key][1])
        differ += not (same_sel and same_pred)
        print(f"{key[0]:<50} round {key[1]}: {'identical' if same_sel and same_pred else 'DIFFERENT'}")
    print(f"{differ} of {len(set(old) | set(new))} rounds differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
