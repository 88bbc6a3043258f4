"""Executors run independent (run, strategy) jobs. Every job reads its experiment's config from disk and writes
its rounds to the experiment's store, so an executor only has to call :func:`execute_job` somewhere.

- :class:`LocalExecutor`: in this process (``workers=1``) or in a pool of spawned processes.
- :class:`RayExecutor`: Ray tasks; the experiment directory must be on a filesystem every node sees.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    exp_dir: str
    run: int
    strategy: str  # the strategy's label (StrategyConfig.label)
    threads: int


def execute_job(job: Job) -> str | None:
    """Run one job to completion; return None, or the error text if it failed (the store records it too)."""
    import torch

    from ..config import load_config
    from .job import run_job

    torch.set_num_threads(job.threads)
    try:
        cfg = load_config(Path(job.exp_dir) / "config.yaml")
        scfg = next(s for s in cfg.strategies if s.label == job.strategy)
        run_job(job.exp_dir, cfg, job.run, scfg)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"


def _die_with_parent() -> None:
    """Worker initializer: on Linux, ask the kernel to kill this worker when its parent dies, so that a killed
    `activelab run` leaves no orphan still writing rounds while a resumed run redoes them."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Executor:
    def run(self, jobs: Sequence[Job], on_done: Callable[[Job, str | None], None]) -> None:
        raise NotImplementedError


class LocalExecutor(Executor):
    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers

    def run(self, jobs, on_done):
        if self.workers == 1:
            for job in jobs:
                on_done(job, execute_job(job))
            return
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_die_with_parent) as pool:
            futures = {pool.submit(execute_job, job): job for job in jobs}
            for fut in cf.as_completed(futures):
                try:
                    error = fut.result()
                except Exception as exc:  # the worker process itself died
                    error = f"worker process failed: {type(exc).__name__}: {exc}"
                on_done(futures[fut], error)


class RayExecutor(Executor):
    """Dispatch jobs as Ray tasks (``pip install 'activelab[ray]'``); ``address`` as for ``ray.init``."""

    def __init__(self, address: str | None = None, cpus_per_job: int = 1) -> None:
        try:
            import ray
        except ImportError as exc:
            from ..errors import ActivelabError

            raise ActivelabError("the Ray executor needs Ray: pip install 'activelab[ray]'") from exc
        self.ray = ray
        self.address = address
        self.cpus_per_job = cpus_per_job

    def run(self, jobs, on_done):
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True)
        remote = ray.remote(num_cpus=self.cpus_per_job)(execute_job)
        pending = {remote.remote(job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    error = ray.get(ref)
                except Exception as exc:
                    error = f"ray task failed: {type(exc).__name__}: {exc}"
                on_done(job, error)


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)
