"""Kill `activelab run --workers 2` with SIGKILL at random moments of a real small experiment (several
strategies), resume it each time, and compare every selected index, test prediction and checkpoint with an
uninterrupted run.

    python benchmarks/bench_kill_resume.py [--kills 20] [--seed 0] [--workers 2] [--runs 2] [--rounds 5]

Prints one line per kill (rounds committed when it landed) and the tally. tests/test_reliability.py runs the
same harness with a handful of kills.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CONFIG = {
    "name": "kill_resume",
    "dataset": {"name": "digits"},
    "bias": {"kind": "step", "ratio": 4},
    "model": {"name": "digits_cnn"},
    "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 32, "epochs": 2},
    "loop": {"initial": 10, "budget": 10, "rounds": 3, "runs": 1, "seed": 11},
    "threads": 1,
    "strategies": [{"name": "random"}, {"name": "entropy"}, {"name": "margin"}, {"name": "coreset"}],
}


def rounds_done(exp: Path) -> int:
    try:
        with sqlite3.connect(f"file:{exp / 'results.sqlite'}?mode=ro", uri=True, timeout=30) as c:
            return c.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    except sqlite3.Error:
        return 0


def snapshot(exp: Path) -> dict:
    """Every recorded index and prediction, and every checkpoint's bytes of weights."""
    import torch

    from activelab.experiment.store import Store

    with Store(exp / "results.sqlite", readonly=True) as store:
        out = {
            (r.run, r.strategy, r.round): (r.selected.tolist(), r.test_predictions.tolist(), r.labeled_per_class)
            for r in store.rounds()
        }
    for p in sorted((exp / "models").rglob("*.pt")):
        out[str(p.relative_to(exp))] = [v.numpy().tobytes() for v in torch.load(p, weights_only=True).values()]
    return out


def _command(cfg: Path, out: Path, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "activelab.cli",
        "run",
        str(cfg),
        "--out",
        str(out),
        "--quiet",
        "--workers",
        str(workers),
    ]


def kill_and_resume(
    workdir: Path, kills: int, workers: int = 2, seed: int = 0, log=print, runs: int = 1, rounds: int = 3
) -> dict:
    """Run the reference (sequentially, in this process), then ``kills`` runs killed at random moments (each
    resuming the last), then one run to the end; returns the tally."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "loop": {**CONFIG["loop"], "runs": runs, "rounds": rounds}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from activelab.experiment.runner import run_experiment

    run_experiment(cfg, workdir / "ref", workers=1, progress=False)  # the reference: sequential, in this process
    total = rounds_done(workdir / "ref")
    rng = random.Random(seed)
    exp = workdir / "killed"
    landed, at = 0, []
    for i in range(kills):
        before = rounds_done(exp)
        if before >= total:
            break
        proc = subprocess.Popen(_command(cfg, exp, workers), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait for up to two more rounds (none: a kill during start-up), then a random fraction of a round
        goal = rng.randint(before, min(before + 2, total - 1))
        deadline = time.time() + 300
        while rounds_done(exp) < goal and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            landed += 1
        proc.wait()
        settled = rounds_done(exp)
        time.sleep(1.0)
        if rounds_done(exp) != settled:
            raise AssertionError("a worker went on writing after its parent was killed")
        at.append(settled)
        what = "landed" if proc.returncode == -signal.SIGKILL else "came after the run had finished"
        log(f"kill {i + 1}: {what} at {settled}/{total} rounds")
    final = subprocess.run(_command(cfg, exp, workers), env=env, capture_output=True, text=True)
    identical = final.returncode == 0 and snapshot(exp) == snapshot(workdir / "ref")
    return {
        "kills": landed,
        "attempts": len(at),
        "rounds_at_kill": at,
        "total_rounds": total,
        "identical": identical,
        "final_stderr": final.stderr[-2000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tally = kill_and_resume(Path(tmp), args.kills, args.workers, args.seed, runs=args.runs, rounds=args.rounds)
        print(
            f"{tally['kills']} SIGKILLs landed in {tally['attempts']} attempts (workers={args.workers}, "
            f"{tally['total_rounds']} rounds, {len(CONFIG['strategies'])} strategies); every index, prediction and "
            f"checkpoint identical to the uninterrupted run: {tally['identical']}  ({time.perf_counter() - t0:.0f} s)"
        )
        if not tally["identical"]:
            print(tally["final_stderr"])
            raise SystemExit(1)


if __name__ == "__main__":
    main()
