"""BatchBALD time and peak memory: ours (scoring in chunks of at most 2**22 float64 entries) against the naive
form that scores all candidates at once, holding the (M, N·C) joint table (issue 15).

    OMP_NUM_THREADS=1 python benchmarks/bench_batchbald.py | tee benchmarks/results/bench_batchbald.txt

Inputs: seeded synthetic MC-dropout probabilities, K = 20 passes, N = 10,000 candidates, C = 10 classes (a
shared per-candidate logit plus per-pass noise); b = 100; M = 40000 // C = 4,000 configurations (exact joint
entropy up to 3 picks, sampled after). Each method runs in a fresh single-threaded subprocess; peak memory is
the RSS growth during the selection (the (K, N, C) probabilities are allocated before and not counted). The
naive form is the same computation with the chunk bound lifted (``chunk_elements`` = M·N·C); ``--naive-steps``
limits it to its first greedy steps (its peak is reached at the first sampled step), and its time per sampled
step is then compared with ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from _measure import peak_rss_mb, reset_peak_rss, rss_mb


def mc_probs(k: int, n: int, c: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    logits = 2.0 * rng.standard_normal((1, n, c)) + 1.0 * rng.standard_normal((k, n, c))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def child(args) -> None:
    from activelab.strategies.batchbald import CHUNK_ELEMENTS, batchbald_select, default_num_samples

    probs = mc_probs(args.k, args.n, args.c)
    m = default_num_samples(args.c)
    chunk = CHUNK_ELEMENTS if args.child == "ours" else m * args.n * args.c
    steps = args.budget if args.child == "ours" else args.steps
    reset_peak_rss()
    base = rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    picks, _ = batchbald_select(probs, steps, np.random.default_rng(0), m, chunk)
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = max(0.0, peak_rss_mb() - base)
    # the first 4 steps score against 1, 10, 100, 1000 exact configurations; time them apart from the sampled ones
    cpu = time.process_time()
    batchbald_select(probs, 4, np.random.default_rng(0), m, chunk)
    per_sampled = (total_cpu - (time.process_time() - cpu)) / max(1, steps - 4)
    np.save(args.picks_out, picks)
    print(json.dumps({"seconds": total, "cpu_seconds": total_cpu, "per_sampled_step": per_sampled, "peak_mb": peak}))


def measure(args, method: str, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--k", str(args.k), "--n", str(args.n), "--c", str(args.c),
           "--budget", str(args.budget), "--naive-steps", str(args.steps), "--picks-out", out]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--c", type=int, default=10)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--naive-steps", dest="steps", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--picks-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import tempfile

    tmp = tempfile.mkdtemp()
    m = 40000 // args.c
    print(f"# BatchBALD, K = {args.k}, N = {args.n:,}, C = {args.c}, b = {args.budget}, M = {m:,}; float64; "
          "1 thread; shared 2-core machine")  # fmt: skip
    print(f"# naive (M, N·C) table: {m * args.n * args.c * 8 / 2**30:.1f} GB")
    ours = measure(args, "ours", os.path.join(tmp, "ours.npy"))
    naive = measure(args, "naive", os.path.join(tmp, "naive.npy"))
    same = np.array_equal(np.load(os.path.join(tmp, "ours.npy"))[: args.steps], np.load(os.path.join(tmp, "naive.npy")))
    header = f"{'method':<7} {'steps':>6} {'wall s':>9} {'CPU s':>9} {'CPU s / sampled step':>21} {'peak MB':>9}"
    print(header)
    print("-" * len(header))
    for name, res, steps in (("ours", ours, args.budget), ("naive", naive, args.steps)):
        print(f"{name:<7} {steps:>6} {res['seconds']:>9.1f} {res['cpu_seconds']:>9.1f} "
              f"{res['per_sampled_step']:>21.2f} {res['peak_mb']:>9.0f}")  # fmt: skip
    print(
        f"# same first {args.steps} picks: {same}; naive CPU s for all {args.budget} steps, extrapolated: "
        f"{naive['cpu_seconds'] + naive['per_sampled_step'] * (args.budget - args.steps):.0f}"
    )


if __name__ == "__main__":
    main()
