"""faiss (CPU, exact flat indexes) vs the exact chunked torch path (``backend="exact"``) of
``activelab.neighbors``, on the calls the strategies make: core-set's whole k-center selection (nearest of L
labeled centres for N candidates, then the greedy steps), FK's top-k pool rows per centre, the nearest
labeled row by dot product; and, on a smaller pool (these are N x N work), TypiClust's k nearest neighbours
and ProbCover's delta-ball graph. Time, extra peak memory, agreement of the outputs.

    python benchmarks/bench_faiss.py                 # N = 1,000,000, d = 64, L = 1,000; N x N work at 20,000
    python benchmarks/bench_faiss.py --n 200000 --n-square 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    import numpy as np
    import torch
    from _measure import peak_rss_mb, reset_peak_rss, rss_mb, write_results

    from activelab.neighbors import (
        faiss_available,
        knn_sq_distances,
        max_inner_products,
        radius_graph,
        topk_inner_products,
    )
    from activelab.strategies.coreset import kcenter_greedy

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--labeled", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--n-square", type=int, default=20_000, help="pool for the N x N work (kNN, radius graph)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_faiss.txt"))
    args = parser.parse_args()
    if not faiss_available():
        sys.exit("bench_faiss: faiss is not installed (pip install faiss-cpu)")
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.d)).astype(np.float32)
    centres = rng.normal(size=(args.labeled, args.d)).astype(np.float32)
    lines = [
        f"bench_faiss: N = {args.n:,}, d = {args.d}, L = {args.labeled:,} centres, {args.threads} thread(s), "
        f"faiss {faiss.__version__} (exact flat indexes); shared machine (noisy); extra = peak RSS above the "
        "inputs",
        f"command: python benchmarks/bench_faiss.py {' '.join(sys.argv[1:])}".rstrip(),
        "",
        f"{'call':<40} {'backend':<7} {'CPU s':>7} {'wall s':>7} {'extra MB':>9}  agreement with exact",
    ]
    small = x[: args.n_square] / np.linalg.norm(x[: args.n_square], axis=1, keepdims=True)

    def agree(what, ref, out):
        if what.startswith("core-set"):
            return f"same picks {np.mean(ref == out):.0%}"
        if what.startswith("FK"):
            return (
                f"same neighbours {np.mean(ref[1] == out[1]):.5f}, max |sim diff| {np.abs(ref[0] - out[0]).max():.1e}"
            )
        if what.startswith("nearest"):
            return f"same nearest row {np.mean(ref[0] == out[0]):.5f}"
        if what.startswith("TypiClust"):
            return f"max |distance diff| {np.abs(ref - out).max():.1e}"
        return f"edges {ref.nnz:,} vs {out.nnz:,}, differing {(ref != out).nnz:,}"

    calls = (
        (f"core-set k-center, b={args.budget}", lambda b: kcenter_greedy(x, centres, args.budget, None, backend=b)),
        (f"FK top-32 of N per {args.budget} centres", lambda b: topk_inner_products(x, centres[: args.budget], 32, b)),
        ("nearest of L rows by dot product", lambda b: max_inner_products(x, centres, backend=b)),
        (f"TypiClust 20-NN, N={args.n_square:,}", lambda b: knn_sq_distances(small, 20, backend=b)),
        (f"ProbCover graph, N={args.n_square:,}", lambda b: radius_graph(small, 0.9, backend=b)),
    )
    for what, fn in calls:
        ref = None
        for backend in ("exact", "faiss"):
            base = rss_mb()
            reset_peak_rss()
            c, w = time.process_time(), time.perf_counter()
            out = fn(backend)
            cpu, wall = time.process_time() - c, time.perf_counter() - w
            extra = peak_rss_mb() - base
            note = agree(what, ref, out) if ref is not None else ""
            ref = out
            lines.append(f"{what:<40} {backend:<7} {cpu:7.2f} {wall:7.2f} {extra:9.0f}  {note}")
    write_results("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
