"""Ray: (1) the quickstart experiment on a local 2-CPU Ray cluster (bound to 127.0.0.1) vs ``--workers 2``:
wall time and identical results; (2) sharded scoring (``activelab.distributed.select_sharded``) by Ray tasks and
in turn in one process vs single-process ``activelab.select`` on one synthetic pool: time and picks.

    python benchmarks/bench_ray.py                       # quickstart run 0 (4 jobs), 200,000-sample pool
    python benchmarks/bench_ray.py --runs 0:3 --n 1000000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def start_cluster(cpus: int) -> str:
    import ray
    from ray._private import ray_constants

    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    ctx = ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    return ctx.address_info["gcs_address"]


def rounds_of(exp: Path) -> dict:
    from activelab.experiment.runner import load_experiment

    _, store = load_experiment(exp)
    out = {
        (r.run, r.strategy, r.round): (r.selected.tolist(), r.accuracy, r.test_predictions.tolist())
        for r in store.rounds()
    }
    store.close()
    return out


def bench_quickstart(args, address: str, tmp: Path) -> list[str]:
    env = {**os.environ, **LOOPBACK_ENV, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "activelab.cli", "run", args.config, "--quiet", "--runs", args.runs]
    rows, results = [], {}
    for label, extra in (
        ("--workers 2 (local processes)", ["--workers", "2"]),
        ("--executor ray, local 2-CPU cluster", ["--executor", "ray", "--address", address, "--cpus-per-job", "1"]),
    ):
        times = []
        for rep in range(args.repeats):
            exp = tmp / f"qs_{len(results)}_{rep}"
            t = time.perf_counter()
            subprocess.run([*base, "--out", str(exp), *extra], check=True, env=env, capture_output=True)
            times.append(time.perf_counter() - t)
            results.setdefault(label, rounds_of(exp))
        rows.append((label, times))
    same = len({repr(sorted(r.items())) for r in results.values()}) == 1
    lines = [f"quickstart ({args.config}, runs {args.runs}), wall seconds over {args.repeats} repeat(s):"]
    for label, times in rows:
        lines.append(f"  {label:<40} min {min(times):7.1f}  max {max(times):7.1f}")
    ratio = min(rows[1][1]) / min(rows[0][1])
    lines.append(f"  ray / local: {ratio:.2f}x; identical rounds (selected, accuracy, predictions): {same}")
    return lines


def bench_sharded(args) -> list[str]:
    import numpy as np
    import torch
    from bench_million import make_model, make_pool

    import activelab
    from activelab.distributed import select_sharded

    torch.set_num_threads(1)
    pool, _ = make_pool(args.n + args.labeled)
    torch.manual_seed(0)
    model = make_model()
    labeled = np.arange(args.labeled)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for s in range(0, args.labeled, 50):
            xb, yb = pool.batch(labeled[s : s + 50])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    bounds = np.linspace(args.labeled, len(pool), args.shards + 1).astype(int)
    shards = [pool.subset(np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    offsets = bounds[:-1]
    labeled_data = pool.subset(labeled)
    lines = [
        f"sharded scoring: n = {args.n:,} unlabeled in {args.shards} shards (+{args.labeled:,} labeled), budget "
        f"{args.budget}, batch {args.batch_size}; Ray: {args.shards} tasks on the 2-CPU cluster; wall seconds",
        f"  {'strategy':<22} {'single':>8} {'ray':>8} {'in turn':>8}  picks vs single process",
    ]
    t = time.perf_counter()
    select_sharded("margin", model, shards[:1], 1, executor="ray")  # start the workers (imports torch)
    lines.append(f"  (first Ray call, workers starting: {time.perf_counter() - t:.1f} s, not counted below)")
    cases = [("entropy", {}), ("margin", {}), ("bald", {"mc_samples": 8}), ("coreset", {})]
    for name, params in cases:
        t = time.perf_counter()
        single = activelab.select(
            name, model, pool, labeled=labeled, budget=args.budget, batch_size=args.batch_size, **params
        )
        t_single = time.perf_counter() - t
        picks, times = [], []
        for executor in ("ray", "local"):
            t = time.perf_counter()
            got = select_sharded(
                name, model, shards, args.budget, executor=executor, labeled_data=labeled_data,
                batch_size=args.batch_size, **params,
            )  # fmt: skip
            times.append(time.perf_counter() - t)
            picks.append(offsets[got.ids[:, 0]] + got.ids[:, 1])
        overlap = len(set(picks[0].tolist()) & set(single.tolist())) / args.budget
        same_paths = np.array_equal(np.sort(picks[0]), np.sort(picks[1]))
        note = "identical" if overlap == 1.0 else f"overlap {overlap:.0%}"
        note += f" (ray = in turn: {same_paths}); {got.info['path']}"
        lines.append(f"  {name + str(params or ''):<22} {t_single:8.1f} {times[0]:8.1f} {times[1]:8.1f}  {note}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE.parent / "configs" / "quickstart.yaml"))
    parser.add_argument("--runs", default="0:1")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--labeled", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--skip-sharded", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_ray.txt"))
    args = parser.parse_args()
    address = start_cluster(2)
    lines = [
        "bench_ray: local Ray cluster with 2 CPUs on 127.0.0.1 (Ray " + __import__("ray").__version__ + "); "
        "2-core machine shared with other jobs (noisy)",
        f"command: python benchmarks/bench_ray.py {' '.join(sys.argv[1:])}".rstrip(),
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_quickstart:
            lines += bench_quickstart(args, address, Path(tmp)) + [""]
    if not args.skip_sharded:
        lines += bench_sharded(args)
    from _measure import write_results

    write_results("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
