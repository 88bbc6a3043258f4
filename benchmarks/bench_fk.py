"""FK selection cost against a plain forward pass and against MC-dropout var_ratio (issue 3).

    OMP_NUM_THREADS=1 python benchmarks/bench_fk.py --mc-passes 128 | tee benchmarks/results/bench_fk.txt

(about 25 CPU-minutes, most of it var_ratio's 128 passes; ``--mc-passes 16`` estimates them in 1/8 the time)

On a Fashion-MNIST pool of 50,000 (the first 50k training images; the other 10,000 are the validation set)
with LeNet briefly trained on 2,000 pool images (so that part of the validation set is misclassified), it
times, single-threaded:

- one plain forward pass over the pool (logits only, eval mode, batch 512): the unit of every ratio;
- ``fk`` with p_hat, L = 80 (taps conv1, conv2, fc1), b = 125: validation and pool descriptors, the p_hat
  nearest-neighbour search, k-center, top-K and the fill; everything ``activelab.select`` does;
- ``fk`` with argmax, L = 20 (conv2);
- ``var_ratio`` with K = 128 MC-dropout passes (measured fully unless ``--mc-passes`` is smaller, in which case
  the time is scaled by 128 / passes and the table says so);
- the running-max k-center against the reference's recompute-every-column k-center on the same centres;

and the peak memory growth of fk (p_hat, L = 80) with the pool size, each size in a fresh subprocess (peak
RSS during the selection minus the RSS before it). Targets (issue 3): fk <= 4x forward, <= 1/10 of var_ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from _measure import clock, rss_mb


def load_data(pool_size: int, val_size: int, synthetic: bool):
    from activelab.data.arrays import ArrayDataset

    if not synthetic:
        try:
            from activelab.data.sources import load_split

            train = load_split("fashion_mnist", "train", download=False)
            n = pool_size + val_size
            if len(train) >= n:
                pool = ArrayDataset(train.x[:pool_size], train.y[:pool_size], train.mean.tolist(), train.std.tolist())
                val = ArrayDataset(train.x[pool_size:n], train.y[pool_size:n], train.mean.tolist(), train.std.tolist())
                return pool, val, "fashion_mnist"
        except Exception as exc:  # noqa: BLE001 - fall back to synthetic data and say so
            print(f"# Fashion-MNIST unavailable ({exc}); synthetic images", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (pool_size + val_size, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (pool_size + val_size,), generator=g)
    pool = ArrayDataset(x[:pool_size], y[:pool_size], [0.3], [0.35])
    val = ArrayDataset(x[pool_size:], y[pool_size:], [0.3], [0.35])
    return pool, val, "synthetic"


def make_model(pool, train_size: int = 2000):
    """LeNet trained for one epoch on the first ``train_size`` pool images, or all of a smaller pool (SGD 0.05,
    momentum 0.5, batch 25)."""
    from activelab.models import LeNet

    torch.manual_seed(0)
    model = LeNet(10, 1, 28, dropout=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    model.train()
    train_size = min(train_size, len(pool))
    for s in range(0, train_size, 25):
        x, y = pool.batch(np.arange(s, min(s + 25, train_size)))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def naive_kcenter(x: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """The reference's k-center: every step recomputes the similarities to all chosen centres."""
    xt = torch.as_tensor(x)
    chosen = [int(rng.integers(len(x)))]
    for _ in range(1, k):
        sims = xt[chosen] @ xt.T  # (|chosen|, M)
        worst = sims.max(dim=0).values
        worst[chosen] = torch.inf
        chosen.append(int(torch.argmin(worst)))
    return chosen


class PeakRSS:
    """Polls the resident set size every 5 ms in a thread: the peak during a block (ru_maxrss cannot be reset)."""

    def __enter__(self) -> PeakRSS:
        self.before = rss_mb()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def memory_child(pool_size: int, val_size: int, synthetic: bool) -> None:
    """Run in a subprocess: peak RSS growth of one fk selection (p_hat, L = 80) and of a forward pass."""
    import activelab
    from activelab.inference.forward import forward_pass

    torch.set_num_threads(1)
    pool, val, _ = load_data(pool_size, val_size, synthetic)
    model = make_model(pool)
    with PeakRSS() as fwd:
        forward_pass(model, pool, np.arange(len(pool)), 512)
    with PeakRSS() as fk:
        activelab.select("fk", model, pool, budget=125, validation=val, seed=0, estimator="p_hat")
    print(json.dumps({"pool": pool_size, "forward_mb": fwd.peak - fwd.before, "fk_mb": fk.peak - fk.before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=50_000)
    parser.add_argument("--validation", type=int, default=10_000)
    parser.add_argument("--budget", type=int, default=125)
    parser.add_argument("--mc-passes", type=int, default=16, help="MC passes actually run (scaled to 128)")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[12_500, 25_000, 50_000])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each fk timing (fastest kept)")
    parser.add_argument("--synthetic", action="store_true", help="random images instead of Fashion-MNIST")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.validation, args.synthetic)
        return

    import activelab
    from activelab.inference.descriptors import compute_descriptors
    from activelab.inference.forward import forward_pass
    from activelab.strategies.fisher_kernel import kcenter_running_max, similarity_vectors

    torch.set_num_threads(1)
    pool, val, source = load_data(args.pool, args.validation, args.synthetic)
    model = make_model(pool)
    idx = np.arange(len(pool))
    forward_pass(model, pool, idx[:2048], 512)  # warm-up
    _, t_fwd, w_fwd = clock(lambda: forward_pass(model, pool, idx, 512), repeats=3)
    val_pred = forward_pass(model, val, np.arange(len(val)), 512).logits.argmax(1)
    n_miss = int((val_pred != val.targets).sum())
    print(f"# data: {source}, pool {len(pool)}, validation {len(val)} ({n_miss} misclassified), b={args.budget}")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}; ratios use CPU seconds")

    def fk(**params):
        return activelab.select("fk", model, pool, budget=args.budget, validation=val, seed=0, **params)

    r = args.repeats
    _, t_phat, w_phat = clock(lambda: fk(estimator="p_hat"), r)
    _, t_arg20, w_arg20 = clock(lambda: fk(estimator="argmax", taps=["conv2"]), r)
    _, t_rz, w_rz = clock(lambda: fk(similarity="features"), r)
    _, t_desc, w_desc = clock(
        lambda: compute_descriptors(model, pool, idx, ["conv1", "conv2", "fc1"], {"a": "argmax"}, 512), r
    )

    k = args.mc_passes
    _, t_mc, w_mc = clock(lambda: activelab.select("var_ratio", model, pool, budget=args.budget, seed=0, mc_samples=k))
    t_mc128, w_mc128 = t_mc * 128 / k, w_mc * 128 / k
    mc_note = "measured" if k == 128 else f"estimated: {k} passes measured, x {128 / k:g}"

    # k-center: running max vs the reference's recomputation, on the misclassified validation samples
    vd = compute_descriptors(model, val, np.arange(len(val)), ["conv1", "conv2", "fc1"], {"y": val.targets}, 512)
    miss = np.flatnonzero(vd.predictions != val.targets)
    vec = similarity_vectors(vd.z[miss], vd.segments, vd.g["y"][miss])
    b = min(args.budget, len(miss) - 1)
    picks, t_km, _ = clock(lambda: kcenter_running_max(vec, b, np.random.default_rng(0)))
    naive, t_kn, _ = clock(lambda: naive_kcenter(vec, b, np.random.default_rng(0)))
    assert picks.tolist() == naive, "running-max k-center disagrees with the naive one"

    rows = [
        ("forward pass over the pool (logits)", t_fwd, w_fwd, "1 forward"),
        ("pool descriptors z, g (L=80, argmax)", t_desc, w_desc, "1 forward + 1 backward"),
        ("fk p_hat, L=80 (select, end to end)", t_phat, w_phat, "val + pool descriptors, NN search"),
        ("fk argmax, L=20 (select, end to end)", t_arg20, w_arg20, ""),
        ("fk R_z only, L=80 (select)", t_rz, w_rz, "forward only"),
        ("var_ratio K=128 (select)", t_mc128, w_mc128, mc_note),
    ]
    print(f"\n{'what':<40} {'CPU s':>8} {'wall s':>8} {'x forward':>10}  note")
    for name, t, w, note in rows:
        print(f"{name:<40} {t:>8.2f} {w:>8.2f} {t / t_fwd:>10.2f}  {note}")
    print(f"\nfk p_hat / var_ratio K=128: {t_phat / t_mc128:.3f}  (target <= 0.1)")
    print(f"fk argmax L=20 / var_ratio K=128: {t_arg20 / t_mc128:.3f}")
    print(f"fk p_hat / forward: {t_phat / t_fwd:.2f}  (target <= 4)")
    print(
        f"k-center over {len(miss)} misclassified, b={b}: running max {t_km * 1e3:.1f} ms, "
        f"reference recomputation {t_kn * 1e3:.1f} ms ({t_kn / max(t_km, 1e-9):.0f}x), same picks"
    )

    if args.memory_sizes:
        print("\npeak RSS growth (MB) during one call, fresh process per pool size (polled every 5 ms)")
        print(f"{'pool':>8} {'forward':>9} {'fk p_hat L=80':>14}")
        recs = []
        for n in args.memory_sizes:
            cmd = [sys.executable, __file__, "--memory-child", str(n), "--validation", str(args.validation)]
            if args.synthetic:
                cmd.append("--synthetic")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            recs.append(rec)
            print(f"{n:>8} {rec['forward_mb']:>9.1f} {rec['fk_mb']:>14.1f}")
        if len(recs) > 1:
            slope = (recs[-1]["fk_mb"] - recs[0]["fk_mb"]) / ((recs[-1]["pool"] - recs[0]["pool"]) / 1000)
            print(
                f"fk slope: {slope * 1000 / 1000:.2f} MB per 1,000 pool samples "
                f"(= {slope * 1024 / 1000:.2f} KB per sample; L=80 float32 is 0.31 KB per vector)"
            )
        dense = args.pool * args.validation * 4 / 2**20
        print(
            f"a dense pool x validation float32 matrix would add {args.validation * 4 / 1024:.0f} KB per sample "
            f"({dense:.0f} MB at {args.pool})"
        )


if __name__ == "__main__":
    main()
