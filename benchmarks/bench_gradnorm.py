"""Entropy-gradient-norm query (gradnorm / lplgrad): batched scores vs the per-sample loop (issue 4).

    OMP_NUM_THREADS=1 python benchmarks/bench_gradnorm.py | tee benchmarks/results/bench_gradnorm.txt
    OMP_NUM_THREADS=1 python benchmarks/bench_gradnorm.py --model resnet10 --n 256

On a subset of ``--n`` images (Fashion-MNIST 28x28 for LeNet, synthetic 32x32x3 for ResNet-10, scikit-learn's
8x8 digits, repeated, for the digits CNN) and a model
briefly trained on other images (so that predictions are not uniform), it times, single-threaded, in one
subprocess after warm-up calls, with the methods interleaved and repeated (the minimum of each is kept):

- one plain forward pass over the subset (logits only, eval mode, batch 512): the unit of the ratios;
- the batched scores (``entropy_gradient_norms``), per norm, by each method: ``signals`` (the default: one
  forward and one backward pass per chunk for the layer signals, per-layer norms from inputs and signals) and
  ``vmap`` (torch.func per-sample gradients);
- the one-sample-at-a-time autograd loop (``entropy_gradient_norms_loop``: the authors' way) on the same
  subset (on the first ``--loop-n`` samples and scaled to the subset if ``--loop-n`` is smaller: the table
  says so);

and checks that the batched scores equal the loop's (max relative difference). Peak memory: RSS growth during
one scoring of the subset, each in a fresh subprocess. Target (issue 4): batched >= 20x faster than the loop.
``floor`` = one forward and one backward pass of the summed entropy w.r.t. the layer outputs, nothing else:
the least work of any exact batched method built on backpropagation.
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
from _measure import backward_to_outputs, peak_rss_mb, reset_peak_rss, rss_mb


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
    elif model_name == "digits_cnn":  # scikit-learn's 8x8 digits (1,797 images), repeated to n + 2,000
        from activelab.data.sources import load_split

        train, test = load_split("digits", "train"), load_split("digits", "test")
        x_all, y_all = torch.cat([train.x, test.x]), torch.cat([train.y, test.y])
        reps = np.arange(n + 2000) % len(y_all)
        data, source = (
            ArrayDataset(x_all[reps], y_all[reps], train.mean.tolist(), train.std.tolist()),
            "digits (repeated)",
        )
        model = build_model(ModelConfig(name="digits_cnn", dropout=False), 10, 1, 8)
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


def backward_floor(model, data, subset, chunk: int) -> np.ndarray:
    """One forward and one backward pass of each chunk's summed entropy, gradients w.r.t. every Linear / Conv2d /
    BatchNorm output only (:func:`_measure.backward_to_outputs`); returns the chunks' summed entropies."""
    from activelab.data.arrays import iter_batches
    from activelab.inference.gradients import entropy

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    out = []
    for x, _ in iter_batches(data, subset, chunk):
        (total,) = backward_to_outputs(model, x, layers, lambda logits: [entropy(logits).sum()])
        out.append(total.reshape(1))
    return torch.cat(out).numpy()


def child_time(args) -> None:
    """All timings in this one process, interleaved (forward, batched per norm, loop per norm) and repeated,
    so that the load of a shared machine hits every method alike; the minimum of each is kept."""
    from activelab.inference.forward import forward_pass
    from activelab.inference.gradients import entropy_gradient_norms, entropy_gradient_norms_loop

    torch.set_num_threads(1)
    model, data, subset, source = setup(args.model, args.n)
    norms = args.norms.split(",")
    loop_subset = subset[: args.loop_n]
    methods = args.methods.split(",")
    for norm in norms:  # warm-up (the first torch.func call imports torch._dynamo: seconds)
        for method in methods:
            entropy_gradient_norms(model, data, subset[:8], norm=norm, chunk_size=args.chunk, method=method)
        entropy_gradient_norms_loop(model, data, subset[:8], norm=norm)
    forward_pass(model, data, subset[:8], 512)
    times: dict[str, list[float]] = {}
    scores: dict[str, np.ndarray] = {}

    def timed(key, fn):
        start = time.perf_counter()
        out = fn()
        times.setdefault(key, []).append(time.perf_counter() - start)
        scores[key] = out

    for r in range(args.repeats):
        timed("forward", lambda: forward_pass(model, data, subset, 512).logits)
        timed("floor", lambda: backward_floor(model, data, subset, args.chunk or 64))
        for norm in norms:
            for method in methods:
                timed(
                    f"{method}/{norm}",
                    lambda n=norm, m=method: entropy_gradient_norms(
                        model, data, subset, norm=n, chunk_size=args.chunk, method=m
                    ),
                )
            if r < args.loop_repeats:
                timed(f"loop/{norm}", lambda n=norm: entropy_gradient_norms_loop(model, data, loop_subset, norm=n))
    rel = {}
    for norm in norms:
        loop = scores[f"loop/{norm}"]
        for method in methods:
            diff = np.abs(scores[f"{method}/{norm}"][: len(loop)] - loop) / np.abs(loop)
            rel[f"{method}/{norm}"] = float(np.max(diff))
    params = sum(p.numel() for p in model.parameters())
    result = {"min": {k: min(v) for k, v in times.items()}, "rel": rel, "params": params, "source": source}
    print(json.dumps(result))


def child_memory(args) -> None:
    """Peak RSS growth of one batched scoring of the subset (or of the loop on it), in a fresh process."""
    from activelab.inference.gradients import entropy_gradient_norms, entropy_gradient_norms_loop

    torch.set_num_threads(1)
    model, data, subset, _ = setup(args.model, args.n)
    if args.child == "memory-loop":
        entropy_gradient_norms_loop(model, data, subset[:8], norm=args.norm)
        reset_peak_rss()
        base = rss_mb()
        entropy_gradient_norms_loop(model, data, subset[: args.loop_n], norm=args.norm)
    else:
        method = args.child.removeprefix("memory-")
        entropy_gradient_norms(model, data, subset[:8], norm=args.norm, chunk_size=args.chunk, method=method)
        reset_peak_rss()
        base = rss_mb()
        entropy_gradient_norms(model, data, subset, norm=args.norm, chunk_size=args.chunk, method=method)
    print(json.dumps({"peak_mb": max(0.0, peak_rss_mb() - base)}))


def run_child(args, mode: str, norm: str = "per_tensor_sum") -> dict:
    cmd = [
        sys.executable, __file__, "--child", mode, "--model", args.model, "--n", str(args.n),
        "--loop-n", str(args.loop_n), "--norm", norm, "--norms", args.norms, "--repeats", str(args.repeats),
        "--loop-repeats", str(args.loop_repeats), "--methods", args.methods,
    ]  # fmt: skip
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["lenet", "resnet10", "digits_cnn"], default="lenet")
    parser.add_argument("--n", type=int, default=2000, help="subset size (images scored)")
    parser.add_argument("--loop-n", type=int, default=None, help="samples the loop runs on (default: all n)")
    parser.add_argument("--chunk", type=int, default=None, help="chunk size (default: automatic)")
    parser.add_argument("--methods", default="signals,vmap", help="batched methods to time")
    parser.add_argument("--norms", default="per_tensor_sum,global,last_layer")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of forward and batched (minimum kept)")
    parser.add_argument("--loop-repeats", type=int, default=2, help="timed repeats of the loop (minimum kept)")
    parser.add_argument(
        "--child", choices=["time", "memory-signals", "memory-vmap", "memory-loop"], help=argparse.SUPPRESS
    )
    parser.add_argument("--norm", default="per_tensor_sum", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.loop_n = args.n if args.loop_n is None else min(args.loop_n, args.n)
    args.loop_repeats = max(1, min(args.loop_repeats, args.repeats))
    if args.child == "time":
        child_time(args)
        return
    if args.child:
        child_memory(args)
        return

    res = run_child(args, "time")
    t = res["min"]
    fwd = t["forward"]
    print(
        f"# model {args.model} ({res['params']:,} parameters), data {res['source']}, subset n = {args.n}, 1 thread, "
        f"chunk {args.chunk or 'auto'}; minimum of {args.repeats} interleaved repeats "
        f"(loop: {args.loop_repeats})"
    )
    print(f"# forward pass over the subset (batch 512): {fwd:.3f} s ({1e3 * fwd / args.n:.3f} ms/sample)")
    print(
        f"# floor (forward + one backward pass to the layer outputs): {t['floor']:.3f} s = "
        f"{t['floor'] / fwd:.2f} x forward"
    )
    header = (
        f"{'norm':<15} {'method':<8} {'samples':>7} {'seconds':>9} {'ms/sample':>10} {'x forward':>10} "
        f"{'speedup':>8} {'peak MB':>8} {'max rel diff':>12}"
    )
    print(header)
    print("-" * len(header))
    for norm in args.norms.split(","):
        loop = t[f"loop/{norm}"] * args.n / args.loop_n
        for method in args.methods.split(","):
            batched = t[f"{method}/{norm}"]
            mem_b = run_child(args, f"memory-{method}", norm)["peak_mb"]
            print(
                f"{norm:<15} {method:<8} {args.n:>7} {batched:>9.3f} {1e3 * batched / args.n:>10.3f} "
                f"{batched / fwd:>10.2f} {loop / batched:>7.1f}x {mem_b:>8.0f} {res['rel'][f'{method}/{norm}']:>12.2e}"
            )
        mem_l = run_child(args, "memory-loop", norm)["peak_mb"]
        scaled = "" if args.loop_n == args.n else f"  (measured on {args.loop_n}, scaled to {args.n})"
        print(
            f"{norm:<15} {'loop':<8} {args.n:>7} {loop:>9.3f} {1e3 * loop / args.n:>10.3f} {loop / fwd:>10.2f} "
            f"{'1.0x':>8} {mem_l:>8.0f} {'':>12}{scaled}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
