"""Benchmark: the imbalance strategies' query time relative to one forward pass over the pool, and peak memory.

Command (the saved output in benchmarks/results/bench_imbalance_speed.txt came from it):

    OMP_NUM_THREADS=1 python benchmarks/bench_imbalance_speed.py

Synthetic pool of N candidates plus 1,000 labeled samples, C = 10 classes: softmax outputs from random logits
(scale 3), LeNet-sized features (d = 84, ReLU of Gaussians), true labels equal to the predicted class with
probability 0.8 (else uniform); the oracle answers from those labels. Budget 500.

- ``forward``: one forward pass of LeNet over N 28x28 images (batches of 512), the unit of the ``x forward``
  column (GALAXY's and DIRECT's target: within 5x at 50,000 candidates).
- each strategy's core (:mod:`activelab.strategies`) on the arrays a query context would hand it.
- ``loop``: the per-node reference loops of the tests (the authors' / LabelBench's O(budget x N) Python scans)
  at a size where they finish, against the vectorised cores at the same size (same picks are asserted).

Times are CPU seconds of this process (``time.process_time``; robust to other processes with one thread) and
wall seconds; peak memory is tracemalloc's peak of the allocations made during the call (inputs excluded).
The machine was shared with other jobs: repeat the run to see the spread.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _measure import clock, write_results

from activelab.strategies.balance import base_select, bengar_select, boundary_distances
from activelab.strategies.direct import direct_select
from activelab.strategies.galaxy import galaxy_select
from activelab.strategies.similar import Similarity, gradient_factors, smi_select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    out, cpu, wall = clock(fn)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, cpu, wall, peak / 2**20


def forward_seconds(n: int, classes: int) -> tuple[float, float]:
    from activelab.models.lenet import LeNet

    torch.manual_seed(0)
    model = LeNet(num_classes=classes, in_channels=1).eval()
    x = torch.randn(n, 1, 28, 28)
    with torch.no_grad():
        model(x[:8])
        c0, w0 = time.process_time(), time.perf_counter()
        for s in range(0, n, 512):
            model(x[s : s + 512])
        return time.process_time() - c0, time.perf_counter() - w0


def problem(n: int, n_labeled: int, c: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    m = n + n_labeled
    logits = rng.normal(size=(m, c)) * 3
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    truth = np.where(rng.random(m) < 0.8, probs.argmax(1), rng.integers(0, c, m))
    labeled = np.zeros(m, bool)
    labeled[n:] = True
    h = np.maximum(rng.normal(size=(m, d)), 0).astype(np.float32)
    w = rng.normal(size=(c, d))
    return probs, labeled, np.where(labeled, truth, -1), truth, h, w, logits


def measure(n: int, args, rows: list[str]) -> None:
    c, b = args.classes, args.budget
    fcpu, fwall = forward_seconds(n, c)
    rows.append(f"| {n} | forward pass (LeNet) | {fcpu:.2f} | {fwall:.2f} | 1.00 | |")
    probs, labeled, labels, truth, h, w, logits = problem(n, args.labeled, c, 84)

    def ask(q):
        return truth[q]

    pc = probs[:n]
    q_idx = np.flatnonzero(labeled & (truth == c - 1))[:50]
    query = Similarity(h[q_idx], gradient_factors(probs[q_idx], truth[q_idx]))
    pool = Similarity(h[:n], gradient_factors(pc))
    counts = np.bincount(truth[labeled], minlength=c)
    jobs = {
        "galaxy (round robin)": lambda: galaxy_select(probs, labeled, labels, b, ask, np.random.default_rng(0)),
        "direct (B1=20, 60/class)": lambda: direct_select(probs, labeled, labels, b, ask, np.random.default_rng(0)),
        "similar flqmi, |Q|=50": lambda: smi_select("flqmi", pool, query, b),
        "similar gcmi, |Q|=50": lambda: smi_select("gcmi", pool, query, b),
        "base": lambda: base_select(boundary_distances(logits[:n], w), b, np.random.default_rng(0)),
        "bengar (LP, HiGHS)": lambda: bengar_select(pc, counts, b, 0.6),
    }
    if not args.skip_logdet:
        jobs["similar logdetmi, |Q|=50"] = lambda: smi_select("logdetmi", pool, query, b)
    for name, fn in jobs.items():
        _, cpu, wall, peak = timed(fn)
        rows.append(f"| {n} | {name} | {cpu:.2f} | {wall:.2f} | {cpu / fcpu:.2f} | {peak:.0f} |")
        print(rows[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000])
    ap.add_argument("--budget", type=int, default=500)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--labeled", type=int, default=1_000)
    ap.add_argument("--loop-size", type=int, default=20_000, help="candidates for the GALAXY loop")
    ap.add_argument("--loop-budget", type=int, default=500)
    ap.add_argument("--direct-loop-size", type=int, default=3_000, help="the DIRECT loop is O(N^2) per sub-batch")
    ap.add_argument("--direct-loop-budget", type=int, default=100)
    ap.add_argument("--skip-logdet", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_imbalance_speed.txt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    c = args.classes
    rows = ["| N | method | CPU s | wall s | x forward (CPU) | peak MiB |", "|---|---|---|---|---|---|"]
    for n in args.sizes:
        measure(n, args, rows)
    # loops at a size where they finish
    from tests.test_direct import _reference as direct_loop
    from tests.test_galaxy import _reference as galaxy_loop

    rows += ["", "Per-node loops (tests' references) at sizes where they finish; same picks asserted:", ""]
    rows += ["| method | N + labeled | budget | vectorised CPU s | loop CPU s | speed-up |", "|---" * 6 + "|"]
    for name, n, lb in (
        ("galaxy", args.loop_size, args.loop_budget),
        ("direct (tie: left)", args.direct_loop_size, args.direct_loop_budget),
    ):
        probs, labeled, labels, truth, *_ = problem(n, 200, c, 8, seed=1)
        if name == "galaxy":
            fast = partial(galaxy_select, probs, labeled, labels, lb, truth.__getitem__, np.random.default_rng(0))
            slow = partial(galaxy_loop, probs, labeled, labels, lb, truth, np.random.default_rng(0), "round_robin")
        else:
            rng = np.random.default_rng(0)
            fast = partial(direct_select, probs, labeled, labels, lb, truth.__getitem__, rng, 20, 60, "left")
            slow = partial(direct_loop, probs, labeled, labels, lb, truth, np.random.default_rng(0))
        a, fcpu_, _ = clock(fast)
        r, scpu, _ = clock(slow)
        assert np.array_equal(a, r), name
        rows.append(f"| {name} | {n} + 200 | {lb} | {fcpu_:.3f} | {scpu:.2f} | {scpu / fcpu_:.0f}x |")
        print(rows[-1], flush=True)
    write_results("\n".join(rows), args.out)


if __name__ == "__main__":
    main()
