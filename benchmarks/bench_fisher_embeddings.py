"""Benchmark: batched Fisher embeddings (layer signals by default; vmap(jacrev) as the alternative) against a
per-sample, per-class autograd loop; and the selection time of ``fishermask`` and ``bait`` against one forward pass.

Command (the saved output in benchmarks/results/bench_fisher_embeddings.txt came from it):

    OMP_NUM_THREADS=1 python benchmarks/bench_fisher_embeddings.py | tee benchmarks/results/bench_fisher_embeddings.txt

Model: LeNet (conv 1->10 5x5, conv 10->20 5x5, fc 320->50, fc 50->C), trained for one epoch (Adam, lr 1e-3) on
the labeled images so that its outputs are not uniform. Pool: N + n_L Fashion-MNIST training images (the IDX
files in /usr/share/datasets/fashion-mnist; random uint8 images if absent), the last n_L labeled.

1. Fisher embeddings on a FISH mask of K = floor(pct P) entries (pct chosen so that K is about ``--k``):
   ``batched`` = :func:`activelab.inference.fisher.masked_fisher_embeddings` over the N candidates, by the
   ``signals`` method (the default: gradients w.r.t. each masked layer's output, masked weight entries formed
   from them and the layer's input) and by the ``jacobian`` method (full per-sample Jacobians, then a gather);
   ``loop`` = for each sample one forward pass and C ``torch.autograd.grad`` calls, timed on ``--loop-samples``
   samples and scaled to N; its embeddings are compared with the batched ones. The diagonal Fisher over
   ``fisher_samples`` = 1,024 samples is timed as well.
2. The whole query of each strategy through ``activelab.query.engine.run_query`` (inference + selection), budget b:
   ``fishermask`` at that pct, ``fishermask`` at the paper's pct (0.003: on LeNet K < |W_last|, so the mask is
   the last layer alone), and ``bait``.

``floor`` = one forward and C - 1 batched backward passes per chunk, gradients w.r.t. the masked layers' outputs
only, nothing else: the least any exact batched method must do (C - 1, not C: sum_c p_c d log p_c = 0, so
the last class's gradients follow from the others'), so ``loop / floor`` bounds the possible speedup. The
signal method runs C - 1 passes too (for each sample, every class but its most probable one).
``forward`` = one forward pass (logits and the classifier's input) over the same pool, the unit of ``x forward``.
Times are CPU seconds of this process (``time.process_time``; one thread, so robust to other load).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _measure import backward_to_outputs, clock, write_results

from activelab.data.arrays import ArrayDataset
from activelab.inference.fisher import diagonal_fisher, fisher_mask, masked_fisher_embeddings
from activelab.inference.forward import forward_pass
from activelab.models import LeNet
from activelab.query.engine import RoundSeed, run_query
from activelab.strategies.bait import Bait
from activelab.strategies.fishermask import FisherMaskStrategy


def load_pool(n: int, seed: int) -> tuple[ArrayDataset, str]:
    try:
        from activelab.data.sources import load_split

        train = load_split("fashion_mnist", "train", download=False)
        idx = np.sort(np.random.default_rng(seed).choice(len(train), n, replace=False))
        return train.subset(idx), "Fashion-MNIST"
    except Exception:  # noqa: BLE001 - a benchmark falls back to random images
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        return ArrayDataset(x, torch.randint(0, 10, (n,), generator=g), [0.286], [0.353]), "random uint8"


def train_one_epoch(model: torch.nn.Module, pool: ArrayDataset, idx: np.ndarray, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    order = np.random.default_rng(seed).permutation(idx)
    for s in range(0, len(order), 32):
        x, y = pool.batch(order[s : s + 32])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def loop_embeddings(model, pool, indices, mask) -> np.ndarray:
    """The naive reference: one forward pass per sample and one backward pass per class."""
    params = dict(model.named_parameters())
    wrt = [params[n] for n in mask.names]
    rows = []
    for i in indices:
        x, _ = pool.batch(np.asarray([i]))
        lp = torch.log_softmax(model(x), dim=1)[0]
        per_class = []
        for c in range(len(lp)):
            grads = torch.autograd.grad(lp[c], wrt, retain_graph=True)
            flat = [g.flatten()[idx] for g, idx in zip(grads, mask.indices, strict=True)]
            per_class.append(torch.cat(flat) * lp[c].exp().sqrt())
        rows.append(torch.stack(per_class).detach())
    return torch.stack(rows).numpy()


def backward_floor(model, pool, indices, layer_names, chunk: int = 64) -> float:
    """CPU seconds of one forward and C - 1 batched backward passes per chunk, gradients w.r.t. the outputs of
    the given layers only: the least an exact batched method has to do (C - 1 vector-Jacobian products; the
    gradients of the last class follow from sum_c p_c d log p_c = 0)."""
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    layers = [modules[n] for n in layer_names]
    c0 = time.process_time()
    for s in range(0, len(indices), chunk):
        x, _ = pool.batch(indices[s : s + chunk])
        backward_to_outputs(model, x, layers, lambda z: list(torch.log_softmax(z, dim=1).sum(dim=0))[:-1])
    t = time.process_time() - c0
    for p in model.parameters():
        p.requires_grad_(True)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="unlabeled candidates")
    parser.add_argument("--labeled", type=int, default=250)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=1400, help="target mask size")
    parser.add_argument("--budget", type=int, default=250)
    parser.add_argument("--loop-samples", type=int, default=500, help="samples the loop is timed on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-strategies", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_fisher_embeddings.txt"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    pool, source = load_pool(args.n + args.labeled, args.seed)
    if pool.y.max() >= args.classes:
        pool = pool.with_labels(pool.targets % args.classes)
    candidates = np.arange(args.n)
    labeled = np.arange(args.n, args.n + args.labeled)
    torch.manual_seed(args.seed)
    model = LeNet(num_classes=args.classes)
    train_one_epoch(model, pool, labeled, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    pct = (args.k + 0.5) / n_params

    _, t_fwd, _ = clock(lambda: forward_pass(model, pool, np.arange(len(pool)), 512, embeddings=True))
    sample = np.sort(np.random.default_rng(args.seed).choice(len(pool), min(1024, len(pool)), replace=False))
    fisher, t_fisher, _ = clock(lambda: diagonal_fisher(model, pool, sample))
    mask = fisher_mask(fisher, "fc2.weight", pct)
    v, t_batched, _ = clock(lambda: masked_fisher_embeddings(model, pool, candidates, mask, method="signals"))
    v_jac, t_jac, _ = clock(lambda: masked_fisher_embeddings(model, pool, candidates, mask, method="jacobian"))
    m = args.loop_samples
    v_loop, t_loop_m, _ = clock(lambda: loop_embeddings(model, pool, candidates[:m], mask))
    t_loop = t_loop_m * args.n / m
    layer_names = sorted({n.rpartition(".")[0] for n in mask.names})
    t_floor = backward_floor(model, pool, candidates, layer_names)
    scale = max(1e-12, float(np.abs(v_loop).max()))
    max_err = max(float(np.abs(v_loop - v[:m]).max()), float(np.abs(v_loop - v_jac[:m]).max())) / scale

    lines = [
        f"# python benchmarks/bench_fisher_embeddings.py --n {args.n} --labeled {args.labeled} --classes "
        f"{args.classes} --k {args.k} --budget {args.budget} --loop-samples {m} --seed {args.seed}"
        "   (OMP_NUM_THREADS=1)",
        f"# {source}; LeNet with C={args.classes}, P={n_params} parameters; mask K={mask.size} (pct={pct:.5f}), "
        f"of which {mask.counts()['fc2.weight']} in fc2.weight; counts {mask.counts()}",
        f"# forward = one pass (logits + classifier input) over the pool of {len(pool)} images: {t_fwd:.2f} s CPU",
        "",
        "1. Fisher embeddings (N x C x K) of the N candidates",
        f"{'method':<34}{'CPU s':>10}{'x forward':>11}{'speedup':>10}",
        f"{'batched, signals (default)':<34}{t_batched:>10.2f}{t_batched / t_fwd:>11.1f}{t_loop / t_batched:>10.1f}",
        f"{'batched, full Jacobian':<34}{t_jac:>10.2f}{t_jac / t_fwd:>11.1f}{t_loop / t_jac:>10.1f}",
        f"{f'per-sample loop (x{args.n / m:.0f} from {m})':<34}{t_loop:>10.2f}{t_loop / t_fwd:>11.1f}{1.0:>10.1f}",
        f"{'floor: C-1 batched backward passes':<34}{t_floor:>10.2f}{t_floor / t_fwd:>11.1f}{t_loop / t_floor:>10.1f}",
        f"{'diagonal Fisher, 1,024 samples':<34}{t_fisher:>10.2f}{t_fisher / t_fwd:>11.1f}",
        f"max relative difference of both batched methods vs the loop on {m} samples: {max_err:.2e}",
    ]
    if not args.skip_strategies:
        lines += ["", f"2. Whole query (inference + selection), b={args.budget}, pool N={args.n}, n_L={args.labeled}"]
        lines.append(f"{'strategy':<34}{'CPU s':>10}{'x forward':>11}  notes")
        runs = [
            (f"fishermask pct={pct:.4f}", FisherMaskStrategy(pct=pct, subset=5000)),
            ("fishermask pct=0.003 (paper)", FisherMaskStrategy(pct=0.003, subset=5000)),
            ("bait", Bait(subset=5000)),
        ]
        for name, strategy in runs:
            seed = RoundSeed(np.random.default_rng(args.seed), 0)
            result, t, _ = clock(lambda: run_query(strategy, model, pool, labeled, args.budget, seed))  # noqa: B023
            info = {k: v for k, v in result.info.items() if k != "forward_passes"}
            note = ", ".join(f"{k.split('_', 1)[1]}={v}" for k, v in info.items() if "counts" not in k)
            lines.append(f"{name:<34}{t:>10.2f}{t / t_fwd:>11.1f}  {note}")
    text = "\n".join(lines)
    write_results(text, args.out)


if __name__ == "__main__":
    main()
