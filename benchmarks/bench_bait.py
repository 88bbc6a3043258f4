"""Benchmark: BAIT's cached greedy (rank-C Woodbury updates of per-candidate C x C products) against the
from-scratch reference that recomputes V_x M^-1 F M^-1 V_x^T for every candidate at every pick.

Command (the saved output in benchmarks/results/bench_bait.txt came from it):

    OMP_NUM_THREADS=1 python benchmarks/bench_bait.py | tee benchmarks/results/bench_bait.txt

Synthetic Fisher embeddings V (N, C, K) float32: Gaussian rows with a per-sample exponential scale and a decaying
spectrum over the K columns; n_L labeled samples drawn the same way give I_L; F_U is the pool mean
(candidates + labeled). Selection: b picks with backward pruning (2b forward picks, then b removals), lam = 1.

- ``cached f64`` / ``cached f32``: :func:`activelab.strategies.bait.bait_core` with V in float64 / float32 (the
  (N C x K) products in that dtype; M^-1 and the C x C state always float64).
- ``reference``: :func:`bait_select_reference` (float64, M inverted directly). At full size it is far too slow
  to finish, so it runs the first ``--ref-picks`` forward picks; its total is extrapolated to the 2b forward
  picks only (its b removals, each O(2b C K^2), are left out: the extrapolation is a lower bound). The picks
  it made are compared with the cached run's first picks.
- A complete run of both (with pruning) on a smaller problem checks that the whole batch is identical.
- ``forward`` is one LeNet forward pass over N 28x28 images, the unit of the ``x forward`` column.

Times are CPU seconds of this process (``time.process_time``; one thread, so robust to other load) and wall
seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _measure import clock, write_results

from activelab.strategies.bait import bait_core, gram_sum

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.bait_reference import bait_select_reference  # noqa: E402


def problem(n: int, c: int, k: int, n_labeled: int, seed: int):
    rng = np.random.default_rng(seed)
    spectrum = (1.0 / np.arange(1, k + 1)) ** 0.5

    def draw(m: int) -> np.ndarray:
        v = rng.standard_normal((m, c, k), dtype=np.float32)
        v *= rng.exponential(size=(m, 1, 1)).astype(np.float32)
        v *= (spectrum / np.sqrt(k)).astype(np.float32)
        return v

    v, lab = draw(n), draw(n_labeled)
    lab_sum = gram_sum(lab)
    i_l = lab_sum / max(1, n_labeled)
    f_u = (gram_sum(v) + lab_sum) / (n + n_labeled)
    return v, f_u, (i_l if n_labeled else None)


def forward_seconds(n: int, classes: int) -> float:
    from activelab.models import LeNet

    torch.manual_seed(0)
    model = LeNet(num_classes=classes).eval()
    x = torch.randn(n, 1, 28, 28)
    with torch.no_grad():
        model(x[:64])
        c0 = time.process_time()
        for s in range(0, n, 512):
            model(x[s : s + 512])
    return time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=1400)
    parser.add_argument("--budget", type=int, default=250)
    parser.add_argument("--labeled", type=int, default=250)
    parser.add_argument("--ref-picks", type=int, default=3)
    parser.add_argument("--small", default="400,10,120,20", help="N,C,K,b of the complete identity check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_bait.txt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, c, k, b = args.n, args.classes, args.k, args.budget

    v32, f_u, i_l = problem(n, c, k, args.labeled, args.seed)
    r64, c64, w64 = clock(lambda: bait_core(v32.astype(np.float64), f_u, i_l, args.labeled, b, prune=True))
    r32, c32, w32 = clock(lambda: bait_core(v32, f_u, i_l, args.labeled, b, prune=True))
    m = args.ref_picks
    (ref_picks, _), c_ref, w_ref = clock(
        lambda: bait_select_reference(v32, f_u, i_l, args.labeled, b, prune=True, max_picks=m)
    )
    n_forward = min(n, 2 * b)
    c_ref_total, w_ref_total = c_ref / m * n_forward, w_ref / m * n_forward
    fwd = forward_seconds(n, c)

    sn, sc, sk, sb = (int(x) for x in args.small.split(","))
    sv, sf, si = problem(sn, sc, sk, args.labeled, args.seed + 1)
    (small_ref, _), c_sref, _ = clock(lambda: bait_select_reference(sv, sf, si, args.labeled, sb, prune=True))
    small_fast, c_sfast, _ = clock(lambda: bait_core(sv.astype(np.float64), sf, si, args.labeled, sb, prune=True))

    def row(name, cpu, wall, note=""):
        return f"{name:<24}{cpu:>10.2f}{wall:>10.2f}{cpu / fwd:>11.1f}{c_ref_total / cpu:>10.1f}  {note}"

    lines = [
        f"# python benchmarks/bench_bait.py --n {n} --classes {c} --k {k} --budget {b} --labeled {args.labeled} "
        f"--ref-picks {m} --small {args.small} --seed {args.seed}   (OMP_NUM_THREADS=1)",
        f"# N={n} candidates, C={c}, K={k}, b={b} with pruning (2b={n_forward} forward picks, then {n_forward - b} "
        f"removals), n_L={args.labeled}, lam=1",
        f"# forward = LeNet over N 28x28 images: {fwd:.2f} s CPU",
        "",
        f"{'method':<24}{'CPU s':>10}{'wall s':>10}{'x forward':>11}{'speedup':>10}",
        row("cached f64", c64, w64),
        row("cached f32", c32, w32),
        row("reference (extrap.)", c_ref_total, w_ref_total, f"{m} picks in {c_ref:.1f} s CPU, x{n_forward / m:.0f}"),
        "",
        f"reference's first {m} picks == cached f64's first {m}: "
        f"{bool(np.array_equal(ref_picks, r64.forward[:m]))} ({ref_picks.tolist()} vs {r64.forward[:m].tolist()})",
        f"cached f32 batch == cached f64 batch (same order): {bool(np.array_equal(r32.positions, r64.positions))}; "
        f"same set: {set(r32.positions.tolist()) == set(r64.positions.tolist())}",
        f"complete run at N={sn}, C={sc}, K={sk}, b={sb} with pruning: reference {c_sref:.1f} s, cached "
        f"{c_sfast:.2f} s, identical batch and order: {bool(np.array_equal(small_ref, small_fast.positions))}",
    ]
    text = "\n".join(lines)
    write_results(text, args.out)


if __name__ == "__main__":
    main()
