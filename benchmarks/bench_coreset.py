"""Core-set (greedy k-center) time and peak memory: ours (O(N) memory) against the dense-matrix version (issue 4).

    OMP_NUM_THREADS=1 python benchmarks/bench_coreset.py | tee benchmarks/results/bench_coreset.txt

Embeddings are seeded Gaussian vectors (N candidates + L labeled, d = 512), float32; the budget is b = 1,000.
Every measurement runs in a fresh subprocess (single thread); peak memory is the RSS growth during the
selection (the embeddings themselves are allocated before and not counted).

- ours: ``kcenter_greedy`` (distances to the labeled set in blocks, then one (N,) minimum per pick), at every
  size of ``--sizes`` (default up to N = 50,000);
- dense: the textbook version that first builds the (N + L) x (N + L) distance matrix, then runs the same
  greedy on its columns. It is measured at the sizes of ``--dense-sizes`` only (its memory is quadratic:
  51,000^2 float32 = 10.4 GB, and its matrix costs N^2·d multiply-adds), and the table extrapolates it to the
  largest N by the measured quadratic growth; extrapolated rows are marked. Picks are compared with ours at
  each measured size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from _measure import peak_rss_mb, reset_peak_rss, rss_mb


def embeddings(n: int, n_labeled: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n + n_labeled, d), dtype=np.float32)
    return x[:n], x[n:]


def dense_kcenter(points: np.ndarray, labeled: np.ndarray, budget: int) -> np.ndarray:
    """Greedy k-center from the full (N + L) x (N + L) distance matrix (squared Euclidean, float32)."""
    allp = torch.from_numpy(np.concatenate([points, labeled]))
    sq = (allp * allp).sum(1)
    dist = torch.addmm(sq.unsqueeze(0), allp, allp.T, alpha=-2).add_(sq.unsqueeze(1)).clamp_(min=0)
    n = len(points)
    cur = dist[:n, n:].min(dim=1).values if len(labeled) else torch.full((n,), float("inf"))
    picks = np.empty(budget, dtype=np.int64)
    for k in range(budget):
        pick = int(torch.argmax(cur))
        picks[k] = pick
        torch.minimum(cur, dist[:n, pick], out=cur)
        cur[pick] = -1.0
    return picks


def child(args) -> None:
    from activelab.strategies.coreset import kcenter_greedy

    torch.set_num_threads(1)
    points, labeled = embeddings(args.n, args.labeled, args.dim)
    reset_peak_rss()
    base = rss_mb()
    start = time.perf_counter()
    if args.child == "ours":
        picks = kcenter_greedy(points, labeled, args.budget, np.random.default_rng(0))
    else:
        picks = dense_kcenter(points, labeled, args.budget)
    seconds = time.perf_counter() - start
    np.save(args.picks_out, picks)
    print(json.dumps({"seconds": seconds, "peak_mb": max(0.0, peak_rss_mb() - base)}))


def measure(args, method: str, n: int, picks_out: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", method, "--n", str(n), "--labeled", str(args.labeled),
        "--dim", str(args.dim), "--budget", str(args.budget), "--picks-out", picks_out,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,10000,20000,50000", help="candidate pool sizes N for ours")
    parser.add_argument("--dense-sizes", default="5000,10000,20000", help="N at which the dense one is run")
    parser.add_argument("--labeled", type=int, default=1000, help="labeled set size L")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--child", choices=["ours", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--picks-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import tempfile

    tmp = tempfile.mkdtemp()
    sizes = [int(s) for s in args.sizes.split(",")]
    dense_sizes = [int(s) for s in args.dense_sizes.split(",") if s]
    print(f"# greedy k-center, d = {args.dim}, L = {args.labeled} labeled, budget {args.budget}, float32, 1 thread")
    print(f"# embeddings of N = {max(sizes):,}: {max(sizes) * args.dim * 4 / 2**20:.0f} MB (not counted)")
    header = f"{'N':>7} {'method':<7} {'seconds':>9} {'peak MB':>9} {'time vs ours':>13} {'mem vs ours':>12} {'same picks':>11}"  # noqa: E501
    print(header)
    print("-" * len(header))
    dense_fit = []
    for n in sorted(set(sizes) | set(dense_sizes)):
        ours_path = os.path.join(tmp, f"ours_{n}.npy")
        ours = measure(args, "ours", n, ours_path)
        print(f"{n:>7} {'ours':<7} {ours['seconds']:>9.2f} {ours['peak_mb']:>9.0f} {'1.0x':>13} {'1.0x':>12} {'':>11}")
        if n in dense_sizes:
            dense_path = os.path.join(tmp, f"dense_{n}.npy")
            dense = measure(args, "dense", n, dense_path)
            same = np.mean(np.load(ours_path) == np.load(dense_path))
            dense_fit.append((n, dense["seconds"], dense["peak_mb"]))
            print(f"{n:>7} {'dense':<7} {dense['seconds']:>9.2f} {dense['peak_mb']:>9.0f} "
                  f"{dense['seconds'] / ours['seconds']:>12.1f}x {dense['peak_mb'] / max(ours['peak_mb'], 1):>11.1f}x "
                  f"{same:>10.1%}")  # fmt: skip
        elif dense_fit and n > max(m for m, _, _ in dense_fit):
            m, t, mem = max(dense_fit)
            t_est, mem_est = (
                t * (n + args.labeled) ** 2 / (m + args.labeled) ** 2,
                mem * (n + args.labeled) ** 2 / (m + args.labeled) ** 2,
            )
            matrix_mb = (n + args.labeled) ** 2 * 4 / 2**20
            print(f"{n:>7} {'dense*':<7} {t_est:>9.0f} {mem_est:>9.0f} {t_est / ours['seconds']:>12.1f}x "
                  f"{mem_est / max(ours['peak_mb'], 1):>11.1f}x {'':>11}  * extrapolated from N = {m:,} "
                  f"(quadratic); its matrix alone is {matrix_mb:,.0f} MB")  # fmt: skip
        sys.stdout.flush()


if __name__ == "__main__":
    main()
