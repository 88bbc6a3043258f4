"""Benchmark: the standard trainer against a bare PyTorch loop, and peak memory of scoring a pool.

Command (the saved output in benchmarks/results/bench_training.txt came from it):

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py | tee benchmarks/results/bench_training.txt

1. Training speed. LeNet (FK's MNIST model) on 5,000 Fashion-MNIST training images (read from the IDX files in
   /usr/share/datasets/fashion-mnist when present, otherwise random uint8 images of the same shape), batch 25,
   SGD lr 0.05 momentum 0.5 with a milestone schedule, no augmentation. ``activelab`` = one call of
   ``get_trainer("standard").fit`` (uint8 pool normalised batch by batch, training-accuracy bookkeeping,
   schedule, dropout seeded from the generator); ``bare`` = the textbook loop over a pre-normalised float
   tensor with the same model initialisation, optimiser, schedule, batch size, epochs and shuffling. The two
   alternate ``--repeats`` times; the table gives the median wall and CPU (process) time of each and their
   ratios. On a loaded machine trust the CPU-time ratio: wall time then mostly measures the other processes.
2. Memory of scoring a pool. ``activelab.inference.forward.forward_pass`` (logits only) over pools of N uint8
   28x28 images, each N in a fresh subprocess. Once the pool and model exist and one small pass has warmed
   up, the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5) and the resident set size read;
   after the full pass the peak (VmHWM) is read again (fallback where that is not allowed: ``ru_maxrss``
   deltas). ``extra`` is the peak growth beyond the N x C float32 output; it should depend on the batch
   size, not on N. The ``naive`` rows score the whole pool as one batch (batch = N) for contrast. Each row
   runs twice: with glibc's default allocator, whose dynamic mmap threshold lets freed activation buffers
   fragment the heap (a slow drift with N that is the allocator's, not the algorithm's), and with a fixed
   threshold (``MALLOC_MMAP_THRESHOLD_=131072``), which shows the algorithm's own footprint.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _measure import peak_rss_mb, reset_peak_rss, rss_mb
from torch.nn import functional as F

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def load_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    images, labels = FMNIST / "train-images-idx3-ubyte.gz", FMNIST / "train-labels-idx1-ubyte.gz"
    if images.exists() and labels.exists():
        with gzip.open(images) as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
        with gzip.open(labels) as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
        return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)), "Fashion-MNIST"
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, 10, (n,), generator=g), "random uint8"


def bare_loop(model, x_float, y, epochs, batch_size, lr, momentum, milestones, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    model.train()
    n = len(y)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(x_float[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()


def bench_training(args) -> list[str]:
    from activelab.config import ModelConfig, TrainConfig
    from activelab.data.arrays import ArrayDataset
    from activelab.models import build_model
    from activelab.train import get_trainer

    x, y, source = load_images(args.train_size)
    pool = ArrayDataset(x, y, mean=[0.2860], std=[0.3530])
    x_float = pool.batch(np.arange(len(pool)))[0]  # the bare loop gets its data pre-normalised
    milestones = [max(1, args.epochs // 2)]
    cfg = TrainConfig(lr=0.05, momentum=0.5, batch_size=args.batch_size, epochs=args.epochs, milestones=milestones)
    torch.manual_seed(0)
    init = build_model(ModelConfig(name="lenet"), 10, 1, 28).state_dict()
    trainer = get_trainer("standard")
    times: dict[str, list[float]] = {"activelab": [], "bare": []}
    cpu: dict[str, list[float]] = {"activelab": [], "bare": []}
    inner: list[float] = []
    warm = build_model(ModelConfig(name="lenet"), 10, 1, 28)  # untimed warm-up of both paths
    bare_loop(warm, x_float[:500], y[:500], 1, args.batch_size, 0.05, 0.5, milestones, 0)
    trainer.fit(warm, pool, np.arange(500), cfg.model_copy(update={"epochs": 1}), generator=torch.Generator())
    for rep in range(args.repeats):
        for which in ("bare", "activelab") if rep % 2 == 0 else ("activelab", "bare"):
            torch.manual_seed(0)
            model = build_model(ModelConfig(name="lenet"), 10, 1, 28)
            model.load_state_dict(init)
            start, start_cpu = time.perf_counter(), time.process_time()
            if which == "bare":
                bare_loop(model, x_float, y, args.epochs, args.batch_size, 0.05, 0.5, milestones, rep)
            else:
                result = trainer.fit(
                    model, pool, np.arange(len(pool)), cfg, generator=torch.Generator().manual_seed(rep)
                )
                inner.append(result.seconds)
            times[which].append(time.perf_counter() - start)
            cpu[which].append(time.process_time() - start_cpu)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    lines = [
        f"## training: LeNet, {args.train_size} {source} images 28x28, batch {args.batch_size}, "
        f"{args.epochs} epochs, SGD, {torch.get_num_threads()} thread(s), median of {args.repeats}",
        f"{'loop':<12}{'wall s':>8}{'ratio':>7}{'cpu s':>8}{'ratio':>7}   wall runs (s)",
    ]
    for k in ("bare", "activelab"):
        lines.append(
            f"{k:<12}{med[k]:>8.2f}{med[k] / med['bare']:>7.3f}{med_cpu[k]:>8.2f}"
            f"{med_cpu[k] / med_cpu['bare']:>7.3f}   " + " ".join(f"{t:.2f}" for t in times[k])
        )
    lines.append(
        f"(fastest wall runs: ratio {min(times['activelab']) / min(times['bare']):.3f}; activelab's own "
        f"TrainResult.seconds, median: {statistics.median(inner):.2f} s; load average before: "
        f"{os.getloadavg()[0]:.1f})"
    )
    return lines


def _reset_peak() -> tuple[int, str]:
    """Reset the peak-RSS mark if the kernel allows it; return (baseline bytes, method)."""
    try:
        reset_peak_rss()
        return int(rss_mb() * 2**20), "VmHWM"
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def _peak(method: str) -> int:
    if method == "VmHWM":
        return int(peak_rss_mb() * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_child(n: int, batch_size: int) -> dict:
    """Runs in a fresh interpreter: peak RSS growth of a logits-only pass over an n-image pool."""
    torch.set_num_threads(1)
    from activelab.config import ModelConfig
    from activelab.data.arrays import ArrayDataset
    from activelab.inference.forward import forward_pass
    from activelab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="lenet"), 10, 1, 28)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    pool = ArrayDataset(x, torch.zeros(n, dtype=torch.int64), mean=[0.2860], std=[0.3530])
    forward_pass(model, pool, np.arange(8), 8)  # warm up kernels with a tiny batch
    gc.collect()
    before, method = _reset_peak()
    start = time.perf_counter()
    out = forward_pass(model, pool, np.arange(n), batch_size)
    seconds = time.perf_counter() - start
    after = _peak(method)
    return {
        "method": method,
        "n": n,
        "batch_size": batch_size,
        "pool_mb": x.numel() / 2**20,
        "output_mb": out.logits.nbytes / 2**20,
        "delta_mb": (after - before) / 2**20,
        "seconds": seconds,
    }


ALLOCATORS = {"default": {}, "fixed": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def bench_memory(args) -> list[str]:
    lines = [
        "## memory: forward_pass logits-only, LeNet, uint8 28x28 pools; fresh process per row",
        f"{'':<6}{'malloc':<8}{'N':>7}{'batch':>7}{'pool MB':>9}{'out MB':>8}{'peak +MB':>10}{'extra MB':>10}{'s':>6}",
    ]
    runs = [(n, b) for b in args.score_batch_sizes for n in args.pool_sizes]
    runs += [(n, n) for n in args.naive_sizes]
    here = str(Path(__file__).parent)
    method = "?"
    for allocator, extra_env in ALLOCATORS.items():
        env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
        for n, batch_size in runs:
            code = (
                f"import json, sys; sys.path.insert(0, {here!r}); from bench_training import memory_child; "
                f"print(json.dumps(memory_child({n}, {batch_size})))"
            )
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            extra, method = r["delta_mb"] - r["output_mb"], r["method"]
            label = "naive" if batch_size == n else ""
            lines.append(
                f"{label:<6}{allocator:<8}{r['n']:>7}{r['batch_size']:>7}{r['pool_mb']:>9.1f}"
                f"{r['output_mb']:>8.2f}{r['delta_mb']:>10.1f}{extra:>10.1f}{r['seconds']:>6.1f}"
            )
    lines.append(f"peak +MB: growth of the peak RSS ({method}) during the pass; extra = peak +MB - out MB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[10_000, 40_000, 80_000])
    parser.add_argument("--score-batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--naive-sizes", type=int, nargs="*", default=[10_000], help="whole pool, one batch")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("# benchmarks/bench_training.py", " ".join(sys.argv[1:]))
    if not args.skip_training:
        print("\n".join(bench_training(args)), flush=True)
    if not args.skip_memory:
        print()
        print("\n".join(bench_memory(args)), flush=True)


if __name__ == "__main__":
    main()
