"""The results store served from one process, for executors whose workers run on other machines.

SQLite in WAL mode (the store's journal) needs every writer on the machine that holds the file: its locks
and shared-memory index do not work over NFS or other network filesystems, where concurrent writers can
corrupt the database. So under the Ray executor no task opens the file: the driver starts a
:class:`StoreService` (a Ray actor pinned to the driver's node, one call at a time) and every task's store
calls go to it through a :class:`RemoteStore`, which has the methods of :class:`~activelab.experiment.store.Store`
that a job and a lease use. The checkpoints and initial models are plain files written by atomic rename, so
they only need the shared directory.

Within a task, :func:`serving` installs the service for the duration of one job (a process-wide setting, so the
lease's heartbeat thread sees it too) and :func:`open_store` then gives the remote store. A job names its store
by its experiment directory as the driver wrote it in the job, and the service opens that directory's store as
the driver's node sees it (a worker may mount the shared directory elsewhere behind a link).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .store import Store

#: The store methods a job and a lease call (everything a task writes or reads in the store).
SERVED_METHODS = frozenset(
    {"get_meta", "set_job", "put_run", "rounds", "put_round", "try_lease", "renew_lease", "release_lease"}
)

_lock = threading.Lock()
_service: tuple[str, Any] | None = None  # (experiment directory as the driver names it, the service's handle)


class StoreService:
    """Owns one :class:`Store` per experiment directory and runs the calls it receives, one at a time."""

    def __init__(self) -> None:
        self._stores: dict[str, Store] = {}

    def call(self, exp_dir: str, method: str, *args, **kwargs):
        if method not in SERVED_METHODS:
            raise AttributeError(f"the store service does not serve {method!r}")
        if exp_dir not in self._stores:
            from .layout import Layout

            self._stores[exp_dir] = Store(Layout(exp_dir).store)  # the path as this (the driver's) node sees it
        return getattr(self._stores[exp_dir], method)(*args, **kwargs)

    def host(self) -> tuple[str, int]:
        import socket

        return socket.gethostname(), os.getpid()

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()


class RemoteStore:
    """The served methods of a :class:`Store`, each a blocking call to the service."""

    def __init__(self, exp_dir: str, handle: Any) -> None:
        self._exp_dir, self._handle = exp_dir, handle

    def __getattr__(self, method: str):
        if method not in SERVED_METHODS:
            raise AttributeError(f"RemoteStore has no method {method!r} (served: {', '.join(sorted(SERVED_METHODS))})")
        import ray

        def call(*args, **kwargs):
            return ray.get(self._handle.call.remote(self._exp_dir, method, *args, **kwargs))

        return call

    def close(self) -> None:  # the service owns the connection
        pass

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(path: str | Path) -> Store | RemoteStore:
    """The store at ``path``, or, while this process runs a served job, that job's store through the service
    (a job opens no other store)."""
    with _lock:
        service = _service
    if service is not None:
        return RemoteStore(service[0], service[1])
    return Store(path)


@contextmanager
def serving(exp_dir: str, handle: Any) -> Iterator[None]:
    """Send this process's store calls to the service ``handle``, for the experiment ``exp_dir`` (the driver's
    name for it), for the body."""
    global _service
    with _lock:
        previous, _service = _service, (str(exp_dir), handle)
    try:
        yield
    finally:
        with _lock:
            _service = previous


def start_service(ray) -> Any:
    """A :class:`StoreService` actor on this (the driver's) node, holding no CPU. (Under Ray Client,
    ``ray://``, the "driver" node is the cluster's head: the store must then be local to the head.)"""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_restarts=0)(StoreService)
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
