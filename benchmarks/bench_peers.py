"""BADGE and core-set against scikit-activeml's ``Badge`` and ``CoreSet`` on one model, pool and budget.

Command (the saved output in benchmarks/results/bench_peers.txt came from it)::

    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py

Setup: Fashion-MNIST training images, LeNet trained for a few epochs on 500 labeled images, 20,000 unlabeled
candidates, budget 500, one torch thread. Both libraries are timed from the model, in this one process: ours
through ``activelab.select`` (its forward pass included); the peer's ``Badge`` gets a scikit-activeml classifier
whose ``predict_proba`` runs the same LeNet (forward pass included), and its ``CoreSet`` is timed together with
the embedding pass it needs. Times are CPU seconds (process time; with one thread that is what the work costs)
and ratios to one plain forward pass over the candidates. Peak memory: each method again in a fresh child
process (peak RSS above the child's baseline after loading data and model).

Needs ``pip install scikit-activeml`` (an optional benchmark dependency, not a dependency of activelab).
"""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from _measure import clock, peak_rss_mb, reset_peak_rss, write_results

N_CAND, N_LAB, BUDGET = 20_000, 500, 500


def setup(seed: int = 0):
    """(model, pool, labeled, flat normalised images) with a LeNet trained on the labeled images."""
    from activelab.data.sources import load_split
    from activelab.models import LeNet

    torch.manual_seed(seed)
    train = load_split("fashion_mnist", "train", download=False)
    idx = np.random.default_rng(seed).choice(len(train), N_CAND + N_LAB, replace=False)
    pool = train.subset(idx)
    labeled = np.arange(N_LAB)
    model = LeNet(10, 1, 28, dropout=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_lab, y_lab = pool.batch(labeled)
    model.train()
    for _ in range(8):
        for s in range(0, N_LAB, 50):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x_lab[s : s + 50]), y_lab[s : s + 50]).backward()
            opt.step()
    model.eval()
    flat = pool.batch(np.arange(len(pool)))[0].reshape(len(pool), -1).numpy()
    return model, pool, labeled, flat


class TorchClassifier:
    """A scikit-activeml classifier around a fitted torch model: ``predict_proba(X[, return_embeddings])``."""

    @staticmethod
    def make(model):
        from skactiveml.base import SkactivemlClassifier

        class _Clf(SkactivemlClassifier):
            def __init__(self, net=None, classes=None, missing_label=np.nan):
                super().__init__(classes=classes, missing_label=missing_label)
                self.net = net

            def fit(self, X, y, sample_weight=None):
                return self

            def predict_proba(self, X, return_embeddings=False):
                probs, feats = [], []
                hook = self.net.fc2.register_forward_pre_hook(lambda _m, a: feats.append(a[0].detach()))
                try:
                    with torch.no_grad():
                        for s in range(0, len(X), 512):
                            xb = torch.as_tensor(X[s : s + 512], dtype=torch.float32).reshape(-1, 1, 28, 28)
                            probs.append(torch.softmax(self.net(xb), dim=1))
                finally:
                    hook.remove()
                p = torch.cat(probs).double().numpy()
                return (p, torch.cat(feats).double().numpy()) if return_embeddings else p

        return _Clf(model, classes=np.arange(10))


def embeddings(model, flat):
    return TorchClassifier.make(model).predict_proba(flat, return_embeddings=True)[1]


def methods(model, pool, labeled, flat):
    """name -> zero-argument callable returning picks (pool indices)."""
    from skactiveml.pool import Badge, CoreSet

    import activelab

    y = np.full(len(pool), np.nan)
    y[labeled] = pool.targets[labeled]

    def peer_badge():
        q = Badge(random_state=0, clf_embedding_flag_name="return_embeddings")
        return np.asarray(q.query(flat, y, TorchClassifier.make(model), fit_clf=False, batch_size=BUDGET))

    def peer_coreset():
        return np.asarray(CoreSet(random_state=0).query(embeddings(model, flat), y, batch_size=BUDGET))

    return {
        "activelab badge": lambda: activelab.select("badge", model, pool, labeled=labeled, budget=BUDGET, seed=0),
        "scikit-activeml Badge": peer_badge,
        "activelab coreset": lambda: activelab.select(
            "coreset", model, pool, labeled=labeled, budget=BUDGET, seed=0, subset=None
        ),
        "scikit-activeml CoreSet": peer_coreset,
    }


def _memory_child(name, queue):
    torch.set_num_threads(1)
    model, pool, labeled, flat = setup()
    fn = methods(model, pool, labeled, flat)[name]
    reset_peak_rss()
    base = peak_rss_mb()
    fn()
    queue.put(peak_rss_mb() - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_peers.txt"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, pool, labeled, flat = setup()
    cand = np.arange(N_LAB, len(pool))
    from activelab.inference.forward import forward_pass

    _, t_fwd, _ = clock(lambda: forward_pass(model, pool, cand, 512), repeats=args.repeats)
    rows, picks = [], {}
    for name, fn in methods(model, pool, labeled, flat).items():
        out, cpu, wall = clock(fn, repeats=args.repeats)
        picks[name] = out
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_memory_child, args=(name, queue))
        child.start()
        mem = queue.get()
        child.join()
        rows.append((name, cpu, wall, mem))
    by = {r[0]: r for r in rows}
    lines = [
        f"# OMP_NUM_THREADS=1 python benchmarks/bench_peers.py  (LeNet, Fashion-MNIST, {N_CAND:,} candidates, "
        f"{N_LAB} labeled, budget {BUDGET}; shared 2-core machine)",
        f"plain forward pass over the candidates: {t_fwd:.2f} CPU s",
        f"{'method':<26}{'CPU s':>9}{'wall s':>9}{'x forward':>11}{'peak MB':>10}",
    ]
    for name, cpu, wall, mem in rows:
        lines.append(f"{name:<26}{cpu:>9.2f}{wall:>9.2f}{cpu / t_fwd:>11.1f}{mem:>10.0f}")
    for ours, peer in (("activelab badge", "scikit-activeml Badge"), ("activelab coreset", "scikit-activeml CoreSet")):
        lines.append(f"{ours} is {by[peer][1] / by[ours][1]:.1f}x faster than {peer} (CPU time)")
    lab = set(labeled.tolist())
    for name, out in picks.items():
        assert len(set(out.tolist())) == BUDGET and not lab & set(out.tolist()), name
    overlap = len(set(picks["activelab coreset"].tolist()) & set(picks["scikit-activeml CoreSet"].tolist()))
    lines.append(
        "picks: all valid (500 unique, none labeled); BADGE draws are random, so picks differ between libraries; "
        f"core-set overlap {overlap}/{BUDGET}"
    )
    write_results("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
