"""Benchmark: BADGE's factorised k-means++ against k-means++ on materialised gradient embeddings.

Command (the saved output in benchmarks/results/bench_badge.txt came from it):

    OMP_NUM_THREADS=1 python benchmarks/bench_badge.py | tee benchmarks/results/bench_badge.txt

Synthetic pool of N embeddings h (ReLU of Gaussians, float32, as the classifier's input of a ResNet-18 would be)
and softmax outputs p over C classes (random logits, scale 2). BADGE's gradient embedding is
(onehot(argmax p) - p) (x) h, C d entries.

- ``factorised``: :func:`activelab.strategies.badge.kmeans_pp_factorised` on the factors (a, h): memory
  O(N (C + d)).
- ``materialised``: build the N x C d float32 embeddings, then the same k-means++ on them
  (:func:`kmeans_pp_dense`, squared distances by |x|^2 + |c|^2 - 2 x.c with one matrix-vector product per
  centre, as scikit-learn's ``pairwise_distances`` does in BADGE's code). Its time includes building the matrix.
- ``forward``: one forward pass of a CIFAR-style ResNet-18 over N 32x32 images, timed on ``--forward-sample``
  images and scaled linearly to N (stated in the table), as the unit of the ``x forward`` column.

Both k-means++ runs use the same seed; the table says whether the picks are identical. Times are CPU seconds
of this process (``time.process_time``; with one thread this is robust to other processes on the machine) and
wall seconds; peak memory is tracemalloc's peak of the allocations made during the call (inputs excluded).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from _measure import clock, write_results

from activelab.strategies.badge import badge_factors, kmeans_pp_dense, kmeans_pp_factorised, materialise


def timed(fn):
    """:func:`_measure.clock` of ``fn`` plus its peak of traced (Python and numpy) memory, in MiB."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    out, cpu, wall = clock(fn)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, cpu, wall, peak / 2**20


def forward_seconds(n: int, sample: int, classes: int) -> tuple[float, float]:
    from activelab.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=classes, in_channels=3, stem="cifar").eval()
    x = torch.randn(sample, 3, 32, 32)
    with torch.no_grad():
        model(x[:8])
        c0, w0 = time.process_time(), time.perf_counter()
        for s in range(0, sample, 128):
            model(x[s : s + 128])
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return cpu * n / sample, wall * n / sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forward-sample", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_badge.txt"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    rng = np.random.default_rng(args.seed)
    logits = rng.normal(size=(args.n, args.classes)) * 2.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = np.maximum(rng.standard_normal((args.n, args.d), dtype=np.float32), 0.0)
    a, h = badge_factors(p, h)

    fast, f_cpu, f_wall, f_mem = timed(
        lambda: kmeans_pp_factorised(a, h, args.budget, np.random.default_rng(args.seed + 1))
    )

    def dense():
        x = materialise(a, h, np.float32)
        return kmeans_pp_dense(x, args.budget, np.random.default_rng(args.seed + 1))

    slow, d_cpu, d_wall, d_mem = timed(dense)
    fwd_cpu, fwd_wall = forward_seconds(args.n, args.forward_sample, args.classes)

    lines = [
        f"# python benchmarks/bench_badge.py --n {args.n} --d {args.d} --classes {args.classes} "
        f"--budget {args.budget} --seed {args.seed}   (OMP_NUM_THREADS=1)",
        f"# N={args.n}, d={args.d}, C={args.classes}, b={args.budget}; materialised embeddings "
        f"{args.n} x {args.classes * args.d} float32 = {args.n * args.classes * args.d * 4 / 2**30:.2f} GiB",
        f"# forward = ResNet-18 (cifar stem) over N 32x32 images, scaled from {args.forward_sample} images: "
        f"{fwd_cpu:.1f} s CPU",
        "",
        f"{'method':<14}{'CPU s':>10}{'wall s':>10}{'x forward':>11}{'speedup':>9}{'peak MiB':>11}",
        f"{'factorised':<14}{f_cpu:>10.2f}{f_wall:>10.2f}{f_cpu / fwd_cpu:>11.3f}{d_cpu / f_cpu:>9.1f}{f_mem:>11.0f}",
        f"{'materialised':<14}{d_cpu:>10.2f}{d_wall:>10.2f}{d_cpu / fwd_cpu:>11.3f}{1.0:>9.1f}{d_mem:>11.0f}",
        "",
        f"identical picks (same seed, same order): {bool(np.array_equal(fast, slow))}",
        f"inputs held by both: a {a.nbytes / 2**20:.0f} MiB + h {h.nbytes / 2**20:.0f} MiB",
    ]
    text = "\n".join(lines)
    write_results(text, args.out)


if __name__ == "__main__":
    main()
