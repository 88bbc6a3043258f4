"""faiss (CPU, exact flat indexes) vs the chunked torch path for the nearest-neighbour work of the diverse
strategies: core-set's distances from N candidates to the L labeled centres (then the same greedy k-center
picks), and FK-style nearest labeled sample by dot product. Time, extra peak memory, agreement.

    python benchmarks/bench_faiss.py                 # N = 1,000,000, d = 64, L = 1,000
    python benchmarks/bench_faiss.py --n 200000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def greedy_from(dist, x, budget: int):
    """Farthest-first picks starting from the distances ``dist`` (as core-set's k-center greedy)."""
    import numpy as np
    import torch

    x = torch.from_numpy(x)
    x_sq = (x * x).sum(1)
    dist = torch.from_numpy(np.array(dist, dtype=np.float32))
    picks = []
    for _ in range(budget):
        pick = int(torch.argmax(dist))
        picks.append(pick)
        torch.minimum(dist, (x_sq + x_sq[pick] - 2 * (x @ x[pick])).clamp_(min=0), out=dist)
        dist[pick] = -1.0
    return picks


def main() -> None:
    import numpy as np
    import torch
    from _measure import peak_rss_mb, reset_peak_rss, rss_mb, write_results

    from activelab.inference.knn import faiss_available, max_inner_products, min_sq_distances

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--labeled", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=100)
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
        f"{'search':<34} {'backend':<7} {'CPU s':>7} {'wall s':>7} {'extra MB':>9}  agreement with torch",
    ]
    results = {}
    for what, fn in (
        ("min squared distance to L centres", lambda b: min_sq_distances(x, centres, backend=b)),
        ("max dot product over L rows", lambda b: max_inner_products(x, centres, backend=b)),
    ):
        for backend in ("torch", "faiss"):
            base = rss_mb()
            reset_peak_rss()
            c, w = time.process_time(), time.perf_counter()
            out = fn(backend)
            cpu, wall = time.process_time() - c, time.perf_counter() - w
            extra = peak_rss_mb() - base
            results[(what, backend)] = out
            note = ""
            if backend == "faiss":
                ref = results[(what, "torch")]
                if what.startswith("min"):
                    same = np.mean(ref[1] == out[1])
                    diff = np.abs(ref[0] - out[0]).max()
                    note = f"same nearest centre {same:.5f}, max |distance diff| {diff:.2e}"
                else:
                    note = f"same nearest row {np.mean(ref[0] == out[0]):.5f}"
            lines.append(f"{what:<34} {backend:<7} {cpu:7.2f} {wall:7.2f} {extra:9.0f}  {note}")
    key = "min squared distance to L centres"
    picks = {b: greedy_from(results[(key, b)][0], x, args.budget) for b in ("torch", "faiss")}
    overlap = len(set(picks["torch"]) & set(picks["faiss"])) / args.budget
    lines.append(
        f"k-center greedy, budget {args.budget}, from each backend's distances: overlap of picks {overlap:.0%}"
    )
    write_results("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
