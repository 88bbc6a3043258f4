"""Every registered strategy selecting on a 1,000,000-sample pool, each in its own child process.

The pool: synthetic 32-d Gaussian features (stored as 2 x 4 x 4 "images", so that image-shaped strategies such
as VAAL run too), labelled by a random teacher MLP; the model: a small MLP with dropout (32-64-64-10), trained
for two epochs on the labeled set. Each strategy runs with its default parameters (``--params`` overrides
them) in a fresh child process, so its peak resident memory (VmHWM, the whole process: Python, torch, the
pool and the model included) is its own. A strategy may refuse up front with the sizes it would need; a child
whose resident memory passes ``--limit-gb`` is stopped and reported. Time is the query's wall time over the
wall time of one deterministic forward pass over the pool (the same child, measured first).

    python benchmarks/bench_million.py                          # all strategies, n = 1,000,000
    python benchmarks/bench_million.py --strategies margin,var_ratio --n 200000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

D, CLASSES, HIDDEN = 32, 10, 64


def make_model(num_classes: int = CLASSES):
    import torch
    from torch import nn

    class MLP(nn.Module):
        default_taps = ["fc1", "fc2"]
        classifier_name = "fc3"

        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(D, HIDDEN)
            self.fc2 = nn.Linear(HIDDEN, HIDDEN)
            self.drop = nn.Dropout(0.25)
            self.fc3 = nn.Linear(HIDDEN, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.drop(torch.relu(self.fc1(x.flatten(1))))
            return self.fc3(self.drop(torch.relu(self.fc2(h))))

    return MLP()


def make_pool(n: int, seed: int = 0):
    """(pool, validation): ArrayDatasets of float32 features (n, 2, 4, 4) with teacher labels."""
    import torch

    from activelab.data.arrays import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(D, CLASSES, generator=g)
    x = torch.randn(n + 2000, D, generator=g)
    y = torch.empty(len(x), dtype=torch.int64)
    for s in range(0, len(x), 1 << 18):
        y[s : s + (1 << 18)] = (x[s : s + (1 << 18)] @ teacher).argmax(1)
    x = x.view(-1, 2, 4, 4)
    classes = [str(c) for c in range(CLASSES)]
    pool = ArrayDataset(x[:n], y[:n], classes=classes, name="synthetic")
    validation = ArrayDataset(x[n:], y[n:], classes=classes, name="synthetic-val")
    return pool, validation


def child(args) -> dict:
    import numpy as np
    import torch
    from _measure import peak_rss_mb, reset_peak_rss, rss_mb

    import activelab
    from activelab.errors import ActivelabError
    from activelab.inference.forward import forward_pass
    from activelab.strategies.base import get_strategy
    from activelab.train import get_trainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pool, validation = make_pool(args.n)
    labeled = np.arange(args.labeled, dtype=np.int64)
    device = torch.device(args.device)
    model = make_model().to(device)
    cls = get_strategy(args.child)
    trainer = get_trainer(cls.training)
    trainer.prepare(model)
    # two epochs of plain training on the labeled set (the loss module, if any, stays untrained)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for s in range(0, len(labeled), 50):
            xb, yb = (t.to(device) for t in pool.batch(labeled[s : s + 50]))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    params = json.loads(args.params).get(args.child, {})
    t, c = time.perf_counter(), time.process_time()
    forward_pass(model, pool, np.arange(args.n), args.batch_size)
    forward_s, forward_cpu = time.perf_counter() - t, time.process_time() - c
    base = rss_mb()
    reset_peak_rss()
    row = {"strategy": args.child, "params": params, "n": args.n, "forward_s": forward_s, "base_mb": base}
    row["forward_cpu"] = forward_cpu
    t, c = time.perf_counter(), time.process_time()
    try:
        picked = activelab.select(
            args.child,
            model,
            pool,
            labeled=labeled,
            budget=args.budget,
            validation=validation,
            seed=0,
            device=device,
            batch_size=args.batch_size,
            # in-round oracle for the strategies that ask for labels during the selection (galaxy, direct)
            oracle=(lambda idx: pool.y[torch.as_tensor(idx)].numpy()) if getattr(cls, "uses_oracle", False) else None,
            **params,
        )
        row["status"] = "ok"
        row["picked"] = len(picked)
    except ActivelabError as exc:
        row["status"] = "refused"
        row["message"] = str(exc)
    row["query_s"], row["query_cpu"] = time.perf_counter() - t, time.process_time() - c
    row["peak_mb"] = peak_rss_mb()
    return row


def run_child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--n", str(args.n), "--budget", str(args.budget)]
    cmd += ["--labeled", str(args.labeled), "--batch-size", str(args.batch_size), "--params", args.params]
    cmd += ["--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    start, peak_kb, why = time.time(), 0, None
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss_kb = int(status.split("VmRSS:")[1].split()[0])
            peak_kb = max(peak_kb, rss_kb)
        except (OSError, IndexError):
            rss_kb = 0
        if rss_kb > args.limit_gb * 2**20:
            why = f"stopped: resident memory passed {args.limit_gb} GB"
        elif time.time() - start > args.timeout:
            why = f"stopped: over {args.timeout:.0f} s"
        if why:
            proc.kill()
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    if why or proc.returncode != 0:
        return {"strategy": name, "status": why or f"error: {err.strip().splitlines()[-1] if err.strip() else '?'}",
                "peak_mb": peak_kb / 1024, "query_s": time.time() - start}  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict], args) -> str:
    lines = [
        f"bench_million: n = {args.n:,} (32-d synthetic, MLP 32-64-64-10 with dropout), {args.labeled:,} labeled, "
        f"budget {args.budget}, batch {args.batch_size}, {args.threads} torch thread(s), each strategy in its own "
        "process; peak = VmHWM of that process (Python + torch + pool + model; the pool alone is "
        f"{args.n * D * 4 / 2**20:.0f} MB); time ratios are of CPU seconds (one thread), since the machine was "
        "shared with other jobs (wall times are inflated by waiting for a CPU)",
        f"command: python benchmarks/bench_million.py {' '.join(sys.argv[1:])}".rstrip(),
        "",
        f"{'strategy':<18} {'status':<8} {'peak RSS MB':>11} {'query CPU s':>11} {'wall s':>7} {'fwd CPU s':>9} "
        f"{'x forward':>9}  note",
    ]
    for r in rows:
        on_cpu = args.device == "cpu"
        fwd = r.get("forward_cpu" if on_cpu else "forward_s")
        ok = r["status"] == "ok"
        ratio = r["query_cpu" if on_cpu else "query_s"] / fwd if fwd and ok else None
        status = r["status"] if r["status"] in ("ok", "refused") else "FAILED"
        note = r.get("message", "") if r["status"] == "refused" else ("" if status == "ok" else r["status"])
        params = r.get("params") or {}
        if params:
            note = f"params {params}. " + note
        default_k = 128
        if ratio is not None and "mc_samples" in params and params["mc_samples"] != default_k:
            scale = default_k / params["mc_samples"]
            note += f"K = {default_k} (default): {ratio * scale:.0f}x a forward pass (passes scale linearly)"
        query_cpu = f"{r['query_cpu']:11.1f}" if "query_cpu" in r else f"{'-':>11}"
        lines.append(
            f"{r['strategy']:<18} {status:<8} {r['peak_mb']:11.0f} {query_cpu} {r['query_s']:7.1f} "
            f"{fwd if fwd else float('nan'):9.2f} {ratio if ratio is not None else float('nan'):9.1f}  {note[:200]}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--labeled", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: model passes there (times: wall on CUDA)")
    parser.add_argument("--strategies", default=None, help="comma-separated (default: every registered one)")
    parser.add_argument("--params", default="{}", help='JSON {"strategy": {param: value}} overriding defaults')
    parser.add_argument("--limit-gb", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_million.txt"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    import activelab

    names = args.strategies.split(",") if args.strategies else activelab.available_strategies()
    rows = []
    for name in names:
        rows.append(run_child(name, args))
        print(table(rows[-1:], args).splitlines()[-1], flush=True)
    from _measure import write_results

    write_results(table(rows, args), args.out)


if __name__ == "__main__":
    main()
