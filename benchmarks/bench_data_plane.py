"""What the query data plane saves: model passes per strategy, and BADGE / BAIT query time before and after.

Command (the saved output in benchmarks/results/bench_data_plane.txt came from it)::

    OMP_NUM_THREADS=1 python benchmarks/bench_data_plane.py --before 8f1fc1d

1. Forward passes per strategy: every registered strategy (and three wrapped ones) selects 5 of a 60-image pool
   with 12 labeled on a tiny CNN; a hook counts the model's forward calls and the images they carry. "rows /
   pool" is images through the model divided by the pool size (1.00: each image once).
2. BADGE (budget 500) and BAIT (budget 50, its default 5,000-candidate subset) on LeNet, Fashion-MNIST, 20,000
   candidates, 500 labeled: CPU time (one torch thread) and forward calls, with this checkout and, with
   ``--before REV``, with revision REV of the repository (checked out into a temporary git worktree and run in
   a child process on the same data and model). The ratio is before / after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _measure import clock, write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class Counter:
    """Forward-call and row counts of a model (plain calls only; vmapped per-sample calls are not passes)."""

    def __init__(self, model) -> None:
        self.calls = self.rows = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0])


def strategy_counts() -> list[str]:
    import activelab
    from activelab.data.arrays import ArrayDataset
    from activelab.strategies.base import get_strategy
    from activelab.train import get_trainer

    sys.path.insert(0, str(REPO))
    from tests.conftest import TinyNet, make_pool

    pool, labeled = make_pool(), np.arange(0, 60, 5)
    assert isinstance(pool, ArrayDataset)
    cases = [(n, []) for n in activelab.available_strategies()]
    cases += [("margin", ["class_balanced"]), ("badge", [("subsample", {"size": 30})]), ("entropy", ["stochastic"])]
    lines = [f"{'strategy':<32}{'forward calls':>14}{'rows / pool':>13}"]
    for name, wrap in cases:
        torch.manual_seed(0)
        model = TinyNet()
        cls = get_strategy(name)
        if cls.training != "standard":
            get_trainer(cls.training).prepare(model)
        counter = Counter(model)
        params = dict(cls.example_params)
        if name in ("bait", "coreset", "kcenter"):
            params["subset"] = None
        oracle = (lambda idx: pool.targets[idx]) if getattr(cls, "uses_oracle", False) else None
        extra = {"oracle": oracle} if oracle is not None else {}
        activelab.select(
            name, model, pool, labeled=labeled, budget=5, validation=make_pool(24, seed=1), wrap=wrap,
            **extra, **params,
        )  # fmt: skip
        label = name if not wrap else f"{wrap[0] if isinstance(wrap[0], str) else wrap[0][0]}({name})"
        lines.append(f"{label:<32}{counter.calls:>14}{counter.rows / len(pool):>13.2f}")
    return lines


def measure_badge_bait() -> dict:
    from bench_peers import setup

    import activelab

    torch.set_num_threads(1)
    model, pool, labeled, _ = setup()
    out = {}
    for name, budget in (("badge", 500), ("bait", 50)):
        counter = Counter(model)
        _, cpu, wall = clock(lambda n=name, b=budget: activelab.select(n, model, pool, labeled=labeled, budget=b))
        out[name] = {"cpu": cpu, "wall": wall, "calls": counter.calls, "rows": counter.rows}
        model._forward_pre_hooks.clear()
    return out


def before(rev: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), rev], check=True,
                       capture_output=True)  # fmt: skip
        try:
            env = {**os.environ, "PYTHONPATH": str(wt), "OMP_NUM_THREADS": "1"}
            res = subprocess.run([sys.executable, __file__, "--measure-only"], env=env, check=True,
                                 capture_output=True, text=True)  # fmt: skip
            return json.loads(res.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="git revision to compare with (e.g. 8f1fc1d)")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_data_plane.txt"))
    args = parser.parse_args()
    if args.measure_only:
        print(json.dumps(measure_badge_bait()))
        return
    torch.set_num_threads(1)
    lines = [
        f"# OMP_NUM_THREADS=1 python benchmarks/bench_data_plane.py --before {args.before}  (shared 2-core machine)"
    ]
    lines += ["", "1. forward passes per strategy (60-image pool, 12 labeled, budget 5)", *strategy_counts()]
    now = measure_badge_bait()
    then = before(args.before) if args.before else None
    lines += ["", "2. LeNet, Fashion-MNIST, 20,000 candidates, 500 labeled (BADGE b=500, BAIT b=50)"]
    lines.append(
        f"{'strategy':<10}{'after CPU s':>12}{'calls':>7}"
        + (f"{'before CPU s':>14}{'calls':>7}{'before/after':>14}" if then else "")
    )
    for name in ("badge", "bait"):
        row = f"{name:<10}{now[name]['cpu']:>12.2f}{now[name]['calls']:>7}"
        if then:
            row += f"{then[name]['cpu']:>14.2f}{then[name]['calls']:>7}{then[name]['cpu'] / now[name]['cpu']:>14.2f}"
        lines.append(row)
    write_results("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
