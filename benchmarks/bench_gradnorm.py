"""Entropy-gradient-norm query (gradnorm / lplgrad): batched torch.func scores vs the per-sample loop (issue 4).

    OMP_NUM_THREADS=1 python benchmarks/bench_gradnorm.py | tee benchmarks/results/bench_gradnorm.txt
    OMP_NUM_THREADS=1 python benchmarks/bench_gradnorm.py --model resnet10 --n 256

On a subset of ``--n`` images (Fashion-MNIST 28x28 for LeNet, synthetic 32x32x3 for ResNet-10) and a model
briefly trained on other images (so that predictions are not uniform), it times, single-threaded, each in a
fresh subprocess after a warm-up call:

- one plain forward pass over the subset (logits only, eval mode, batch 512): the unit of the ratios;
- the batched scores (``entropy_gradient_norms``: functional_call + vmap + grad, chunked), per norm;
- the one-sample-at-a-time autograd loop (``entropy_gradient_norms_loop``: the authors' way) on the same
  subset (on the first ``--loop-n`` samples and scaled to the subset if ``--loop-n`` is smaller: the table
  says so);

and checks that the batched scores equal the loop's (max relative difference). Peak memory: RSS growth of the
subprocess during the measured call. Target (issue 4): batched >= 20x faster than the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(model_name: str, n: int, seed: int = 0):
    """(model, dataset, subset indices): the model trained 2 epochs on 2,000 images outside the subset."""
    from activelab.config import ModelConfig, TrainConfig
    from activelab.data.arrays import ArrayDataset
    from activelab.models import build_model
    from activelab.train import get_trainer

    torch.manual_seed(seed)
    if model_name == "lenet":
        try:
            from activelab.data.sources import load_split

            data, source = load_split("fashion_mnist", "train", download=False), "fashion_mnist"
        except Exception as exc:  # noqa: BLE001 - fall back to synthetic data and say so
            print(f"# Fashion-MNIST unavailable ({exc}); synthetic images", file=sys.stderr)
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (n + 2000, 1, 28, 28), generator=g, dtype=torch.uint8)
            data, source = ArrayDataset(x, torch.randint(0, 10, (n + 2000,), generator=g), [0.3], [0.35]), "synthetic"
        model = build_model(ModelConfig(name="lenet", dropout=False), 10, 1, 28)
    else:
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (n + 2000,), generator=g)
        x = torch.randint(0, 120, (n + 2000, 3, 32, 32), generator=g)
        x[:, y % 3, :4, :] += (y.view(-1, 1, 1) * 13).expand(-1, 4, 32)  # a weak class signal
        data, source = ArrayDataset(x.clamp(0, 255).to(torch.uint8), y, [0.3] * 3, [0.3] * 3), "synthetic"
        model = build_model(ModelConfig(name=model_name, dropout=False), 10, 3, 32)
    train_idx, subset = np.arange(2000), np.arange(2000, 2000 + n)
    cfg = TrainConfig(lr=0.02, momentum=0.9, batch_size=64, epochs=2)
    get_trainer("standard").fit(model, data, train_idx, cfg, generator=torch.Generator().manual_seed(seed))
    model.eval()
    return model, data, subset, source


def child(args) -> None:
    """Measure one method in this process and print a JSON line."""
    from activelab.inference.forward import forward_pass
    from activelab.inference.gradients import entropy_gradient_norms, entropy_gradient_norms_loop

    torch.set_num_threads(1)
    model, data, subset, source = setup(args.model, args.n)
    if args.method == "loop":
        subset = subset[: args.loop_n]

    def run():
        if args.method == "forward":
            return forward_pass(model, data, subset, 512).logits
        if args.method == "batched":
            return entropy_gradient_norms(model, data, subset, norm=args.norm, chunk_size=args.chunk)
        return entropy_gradient_norms_loop(model, data, subset, norm=args.norm)

    warm = subset[:8]
    if args.method == "batched":
        entropy_gradient_norms(model, data, warm, norm=args.norm, chunk_size=args.chunk)
    elif args.method == "loop":
        entropy_gradient_norms_loop(model, data, warm, norm=args.norm)
    else:
        forward_pass(model, data, warm, 512)
    base = rss_mb()
    times = []
    for _ in range(1 if args.method == "loop" else args.repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    peak = max(0.0, peak_rss_mb() - base)
    if args.method != "forward":
        np.save(args.scores_out, out)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": min(times), "n": len(subset), "peak_mb": peak, "params": params, "source": source}))


def measure(args, method: str, norm: str = "per_tensor_sum", scores_out: str = "") -> dict:
    cmd = [
        sys.executable, __file__, "--child", method, "--model", args.model, "--n", str(args.n),
        "--loop-n", str(args.loop_n), "--norm", norm, "--repeats", str(args.repeats),
        "--scores-out", scores_out or "/dev/null",
    ]  # fmt: skip
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["lenet", "resnet10"], default="lenet")
    parser.add_argument("--n", type=int, default=2000, help="subset size (images scored)")
    parser.add_argument("--loop-n", type=int, default=None, help="samples the loop runs on (default: all n)")
    parser.add_argument("--chunk", type=int, default=None, help="vmap chunk size (default: automatic)")
    parser.add_argument("--norms", default="per_tensor_sum,global,last_layer")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (minimum kept; loop runs once)")
    parser.add_argument("--child", choices=["forward", "batched", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--norm", default="per_tensor_sum", help=argparse.SUPPRESS)
    parser.add_argument("--scores-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.loop_n = args.n if args.loop_n is None else min(args.loop_n, args.n)
    if args.child:
        args.method = args.child
        child(args)
        return

    import tempfile

    tmp = tempfile.mkdtemp()
    fwd = measure(args, "forward")
    print(
        f"# model {args.model} ({fwd['params']:,} parameters), data {fwd['source']}, subset n = {args.n}, "
        f"1 thread, chunk {args.chunk or 'auto'}; times are the minimum of {args.repeats} (loop: 1 run)"
    )
    print(f"# forward pass over the subset: {fwd['seconds']:.3f} s ({1e3 * fwd['seconds'] / args.n:.3f} ms/sample)")
    header = f"{'norm':<15} {'method':<8} {'samples':>7} {'seconds':>9} {'ms/sample':>10} {'x forward':>10} {'speedup':>8} {'peak MB':>8} {'max rel diff':>12}"  # noqa: E501
    print(header)
    print("-" * len(header))
    for norm in args.norms.split(","):
        b_path, l_path = os.path.join(tmp, f"b_{norm}.npy"), os.path.join(tmp, f"l_{norm}.npy")
        batched = measure(args, "batched", norm, b_path)
        loop = measure(args, "loop", norm, l_path)
        loop_full = loop["seconds"] * args.n / loop["n"]
        b_scores, l_scores = np.load(b_path)[: loop["n"]], np.load(l_path)
        rel = float(np.max(np.abs(b_scores - l_scores) / np.abs(l_scores)))
        speedup = loop_full / batched["seconds"]
        print(
            f"{norm:<15} {'batched':<8} {args.n:>7} {batched['seconds']:>9.3f} "
            f"{1e3 * batched['seconds'] / args.n:>10.3f} {batched['seconds'] / fwd['seconds']:>10.2f} "
            f"{speedup:>7.1f}x {batched['peak_mb']:>8.0f} {rel:>12.2e}"
        )
        scaled = "" if loop["n"] == args.n else f"  (measured on {loop['n']}, scaled)"
        print(
            f"{norm:<15} {'loop':<8} {args.n:>7} {loop_full:>9.3f} {1e3 * loop_full / args.n:>10.3f} "
            f"{loop_full / fwd['seconds']:>10.2f} {'1.0x':>8} {loop['peak_mb']:>8.0f} {'':>12}{scaled}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
