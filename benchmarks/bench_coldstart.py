"""TypiClust and ProbCover query time and peak memory: ours (bounded memory) against scikit-activeml's
``TypiClust`` and ``ProbCover`` on the same embeddings, side by side (issue 15).

    OMP_NUM_THREADS=1 python benchmarks/bench_coldstart.py | tee benchmarks/results/bench_coldstart.txt

Embeddings: N Fashion-MNIST training images (pixels / 255) through one fixed Gaussian projection to d = 512,
L2-normalised (real cluster structure, the authors' normalisation); a cold start (no labels), budget b = 100.
Every measurement runs in a fresh single-threaded subprocess; the table gives wall and CPU seconds (min-max over
``--repeats``; on a busy machine CPU time is the steadier one) and the peak RSS growth during the query (the
embeddings are allocated before and not counted).

- ours: ``typiclust_select`` (k-means, then chunked kNN inside clusters) and ``probcover_select`` (exact purity
  delta with alpha 0.95 and k-means with k = 10, chunked CSR radius graph, greedy coverage);
- ours with ``backend="faiss"`` (faiss k-means, ``IndexFlatL2`` kNN and range search);
- scikit-activeml 1.x: ``TypiClust`` (KMeans with L + b clusters, k = 5) and ``ProbCover`` (n_classes = 10,
  its delta grid 0.2 .. 2.0). Its ProbCover holds the dense N x N float64 distance matrix (and boolean N x N
  edge and purity masks), so it is run at ``--skactiveml-probcover-sizes`` only and extrapolated
  quadratically beyond (marked *).
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

FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def embeddings(n: int, d: int) -> np.ndarray:
    from activelab.data.sources import read_idx
    from activelab.neighbors import l2_normalize

    images = read_idx(FASHION, 3)[:n].reshape(n, -1).astype(np.float32) / 255.0
    proj = np.random.default_rng(0).standard_normal((images.shape[1], d), dtype=np.float32) / np.sqrt(d)
    return l2_normalize(images @ proj)


def child(args) -> None:
    import torch
    from skactiveml.pool import ProbCover, TypiClust

    from activelab.strategies.probcover import probcover_select
    from activelab.strategies.typiclust import typiclust_select

    torch.set_num_threads(1)
    x = embeddings(args.n, args.dim)
    reset_peak_rss()
    base = rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    info: dict = {}
    backend = "faiss" if args.child.endswith("_faiss") else "exact"
    if args.child.startswith("ours_typiclust"):
        picks = typiclust_select(x, x[:0], args.budget, np.random.default_rng(0), info=info, backend=backend)
    elif args.child.startswith("ours_probcover"):
        picks = probcover_select(
            x, x[:0], args.budget, np.random.default_rng(0), num_classes=10, info=info, backend=backend
        )
    else:
        y = np.full(len(x), np.nan)
        if args.child == "skactiveml_typiclust":
            picks = TypiClust(random_state=0).query(x, y, batch_size=args.budget)
        else:
            qs = ProbCover(n_classes=10, random_state=0)
            picks = qs.query(x, y, batch_size=args.budget)
            info["probcover_delta"] = float(qs.delta_max_)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    out = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_mb": max(0.0, peak_rss_mb() - base),
        "unique": len(set(np.asarray(picks))),
    }
    if "probcover_delta" in info:
        out["delta"] = info["probcover_delta"]
        out["edges"] = info.get("probcover_edges")
    print(json.dumps(out))


def measure(args, method: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--n", str(n), "--dim", str(args.dim),
           "--budget", str(args.budget)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,10000,50000")
    parser.add_argument("--skactiveml-probcover-sizes", default="5000,10000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument(
        "--methods",
        default="ours_typiclust,skactiveml_typiclust,ours_probcover,skactiveml_probcover,ours_typiclust_faiss,"
        "ours_probcover_faiss",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (the table shows min and max)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    sk_pc = [int(s) for s in args.skactiveml_probcover_sizes.split(",") if s]
    print(f"# Fashion-MNIST pixels -> fixed Gaussian projection to d = {args.dim}, L2-normalised; no labels; "
          f"budget {args.budget}; 1 thread; shared 2-core machine")  # fmt: skip
    header = f"{'N':>7} {'method':<22} {'wall s':>13} {'CPU s':>13} {'peak MB':>9} {'delta':>7} {'edges':>11}"
    print(header)
    print("-" * len(header))
    fit: dict[str, tuple[int, float, float]] = {}
    for n in sizes:
        for method in args.methods.split(","):
            if method == "skactiveml_probcover" and n not in sk_pc:
                if method in fit:
                    m, t, mem = fit[method]
                    f = (n / m) ** 2
                    print(f"{n:>7} {method + '*':<22} {'':>13} {t * f:>13.0f} {mem * f:>9.0f} {'':>7} {'':>11}  "
                          f"* extrapolated (quadratic) from N = {m:,}; its distance matrix alone is "
                          f"{n * n * 8 / 2**20:,.0f} MB")  # fmt: skip
                continue
            runs = [measure(args, method, n) for _ in range(args.repeats)]
            secs = [r["seconds"] for r in runs]
            cpus = [r["cpu_seconds"] for r in runs]
            peak = max(r["peak_mb"] for r in runs)
            if method == "skactiveml_probcover":
                fit[method] = (n, min(cpus), peak)

            def span(v):
                return f"{min(v):.1f}" if len(v) == 1 else f"{min(v):.1f}-{max(v):.1f}"

            delta = f"{runs[0]['delta']:.3f}" if "delta" in runs[0] else ""
            edges = f"{runs[0]['edges']:,}" if runs[0].get("edges") else ""
            assert runs[0]["unique"] == args.budget
            print(f"{n:>7} {method:<22} {span(secs):>13} {span(cpus):>13} {peak:>9.0f} {delta:>7} {edges:>11}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
