"""Executors run independent (run, strategy) jobs. Every job reads its experiment's config from disk and writes
its rounds to the experiment's store, so an executor only has to call :func:`execute_job` somewhere.

- :class:`LocalExecutor`: in this process (``workers=1``) or in a pool of spawned processes.
- :class:`RayExecutor`: Ray tasks; the experiment directory must be on a filesystem every node sees (NFS, a
  cluster filesystem, or one machine). A task that cannot see it fails at once with an error that says so.
  Tasks never open the SQLite store themselves: their store calls go to a service on the driver's node
  (:mod:`.store_service`), since SQLite must not be written over a network filesystem.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Job:
    exp_dir: str
    run: int
    strategy: str  # the strategy's label (StrategyConfig.label)
    threads: int
    #: The experiment's config fingerprint, when the worker must check that it sees the driver's directory
    #: (executors whose workers may run on other machines).
    fingerprint: str | None = None
    #: A handle of the driver's store service: the job's store calls go there instead of opening the SQLite
    #: file, which must not be written from other machines (see :mod:`.store_service`).
    store_service: object | None = None


SHARED_DIRECTORY_HELP = (
    "the Ray executor needs the experiment directory on a filesystem every node of the cluster sees, at the "
    "same path (an NFS or cluster filesystem mount, or a one-machine cluster); pass --out a shared path"
)


def check_shared_directory(job: Job) -> None:
    """Raise :class:`ActivelabError` unless this process sees the driver's experiment directory: its config and
    store exist here and the config has the fingerprint the driver wrote."""
    import socket

    from ..config import load_config
    from ..errors import ActivelabError
    from .layout import CONFIG_NAME, STORE_NAME

    exp_dir = Path(job.exp_dir)
    where = f"a worker on {socket.gethostname()} (pid {os.getpid()})"
    config = exp_dir / CONFIG_NAME
    if not config.is_file() or not (exp_dir / STORE_NAME).is_file():
        raise ActivelabError(f"{where} cannot see the experiment directory {exp_dir}: {SHARED_DIRECTORY_HELP}")
    if job.fingerprint is not None and load_config(config).fingerprint() != job.fingerprint:
        raise ActivelabError(
            f"{where} sees another experiment at {exp_dir} (its config differs from the driver's): "
            f"{SHARED_DIRECTORY_HELP}"
        )


def execute_job(job: Job) -> str | None:
    """Run one job to completion; return None, or the error text if it failed (the store records it too)."""
    import torch

    from ..config import load_config
    from .job import run_job

    torch.set_num_threads(job.threads)
    try:
        if job.fingerprint is not None:
            check_shared_directory(job)
        cfg = load_config(Path(job.exp_dir) / "config.yaml")
        scfg = next(s for s in cfg.strategies if s.label == job.strategy)
        if job.store_service is None:
            run_job(job.exp_dir, cfg, job.run, scfg)
        else:
            from .store_service import serving

            with serving(job.exp_dir, job.store_service):
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


RAY_INSTALL_HINT = "pip install 'activelab[ray]'"


def import_ray():
    """The ``ray`` module, or an :class:`ActivelabError` that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        from ..errors import ActivelabError

        raise ActivelabError(f"the Ray executor needs Ray, which is not installed here: {RAY_INSTALL_HINT}") from exc
    return ray


def _stop_service(ray, service) -> None:
    """Close the store service's connections and end it; a service that already died is only killed."""
    try:
        ray.get(service.close.remote())
    except Exception:  # noqa: BLE001 - the actor died (its connections went with it); do not hide the run's error
        pass
    finally:
        ray.kill(service)


class RayExecutor(Executor):
    """Dispatch jobs as Ray tasks (``pip install 'activelab[ray]'``).

    - ``address``: an existing cluster (``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:10001"``), as for
      ``ray.init``; None starts a local Ray instance for this run and stops it afterwards.
    - ``cpus_per_job``: CPUs each task reserves, and torch threads it runs with (the two always agree); default:
      the config's ``threads``, else 1.
    - ``max_retries``: how often Ray re-runs a job whose worker process died (killed, out of memory, node
      lost). A re-run resumes from the last committed round, so it gives the same results; a job that is
      still lost after the retries is reported as failed, and a later ``activelab run`` resumes it.

    The experiment directory must be on a filesystem every node sees at the same path: each task checks that it
    sees the driver's config and store before doing anything, and fails with an error that says so otherwise.
    Tasks read and write checkpoints there, but never open the SQLite store: a ``StoreService`` actor on
    the driver's node runs their store calls one at a time (SQLite's WAL locking does not hold over network
    filesystems); a task that tries to open the file itself fails (``ACTIVELAB_STORE_SERVICE_ONLY``).
    Every node needs activelab (and the dataset files, or their download) installed like the driver.
    """

    def __init__(
        self,
        address: str | None = None,
        cpus_per_job: int | None = None,
        max_retries: int = 2,
        init_kwargs: dict | None = None,
    ) -> None:
        from ..errors import ActivelabError

        self.ray = import_ray()
        if cpus_per_job is not None and cpus_per_job < 1:
            raise ActivelabError(f"cpus_per_job must be >= 1; got {cpus_per_job}")
        if max_retries < 0:
            raise ActivelabError(f"max_retries must be >= 0; got {max_retries}")
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})

    def prepare(self, jobs: Sequence[Job]) -> list[Job]:
        """The jobs as the tasks get them: threads = the CPUs each task reserves, and the fingerprint each task
        checks the shared directory against."""
        from ..config import load_config

        configs: dict[str, object] = {}
        out = []
        for job in jobs:
            if job.exp_dir not in configs:
                configs[job.exp_dir] = load_config(Path(job.exp_dir) / "config.yaml")
            cfg = configs[job.exp_dir]
            threads = self.cpus_per_job or cfg.threads or 1
            out.append(replace(job, threads=threads, fingerprint=cfg.fingerprint()))
        return out

    def _connect(self) -> bool:
        """Connect to (or start) Ray; True if this call did, so :meth:`run` disconnects afterwards."""
        ray = self.ray
        if ray.is_initialized():
            return False
        kwargs = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
        if self.address is not None:
            kwargs.pop("include_dashboard")  # only for a cluster this call starts
        try:
            ray.init(address=self.address, **kwargs)
        except ConnectionError as exc:
            from ..errors import ActivelabError

            raise ActivelabError(
                f"cannot reach the Ray cluster at {self.address!r}: {exc}. Start one with `ray start --head` "
                "and pass the address it prints (or 'auto' on a node of the cluster)"
            ) from exc
        return True

    def run(self, jobs, on_done):
        jobs = self.prepare(jobs)
        if not jobs:
            return
        ray = self.ray
        connected = self._connect()
        service = None
        try:
            from .store import SERVICE_ONLY_ENV
            from .store_service import start_service

            service = start_service(ray)  # every task's store calls run here, on the driver's node
            jobs = [replace(job, store_service=service) for job in jobs]
            remotes: dict[int, object] = {}
            pending = {}
            for job in jobs:
                if job.threads not in remotes:
                    remotes[job.threads] = ray.remote(
                        num_cpus=job.threads,
                        max_retries=self.max_retries,
                        runtime_env={"env_vars": {SERVICE_ONLY_ENV: "1"}},  # a direct Store() in a task fails
                    )(execute_job)
                pending[remotes[job.threads].remote(job)] = job
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        error = ray.get(ref)
                    except Exception as exc:  # the task's worker died (after the retries) or Ray failed
                        error = f"ray task failed: {type(exc).__name__}: {exc}"
                    on_done(job, error)
        finally:
            try:
                if service is not None:
                    _stop_service(ray, service)
            finally:
                if connected:
                    ray.shutdown()
