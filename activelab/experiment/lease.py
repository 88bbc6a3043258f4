"""Leases in the results store: one process, on any machine that sees the experiment directory, does a piece of
shared work (making a run's initial model) while the others wait.

A lease is a row (name, owner, pid, host, heartbeat) taken in one ``BEGIN IMMEDIATE`` transaction. Its holder
renews the heartbeat from a thread; a holder is stale when it ran on this host and its process is gone, or when
its heartbeat is older than :data:`STALE_SECONDS` (another host), and a stale lease is taken over.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .store import LeaseRecord
from .store_service import open_store

HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0
POLL_SECONDS = 0.2


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(rec: LeaseRecord, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if rec.host == socket.gethostname():
        return not pid_alive(rec.pid)
    return now - rec.heartbeat > STALE_SECONDS


@contextmanager
def holding_lease(store_path: str | Path, name: str, done: Callable[[], bool] = lambda: False) -> Iterator[bool]:
    """Hold lease ``name`` for the body; wait while a live holder has it. Yields True when this process holds
    it; yields False without waiting further as soon as ``done()`` says the work exists (another holder did it).
    """
    owner, pid, host = uuid.uuid4().hex, os.getpid(), socket.gethostname()
    store = open_store(store_path)
    try:
        while store.try_lease(name, owner, pid, host, is_stale) is not None:
            if done():
                yield False
                return
            time.sleep(POLL_SECONDS)
        stop = threading.Event()

        def beat() -> None:
            with open_store(store_path) as s:
                while not stop.wait(HEARTBEAT_SECONDS):
                    s.renew_lease(name, owner)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield True
        finally:
            stop.set()
            thread.join()
            store.release_lease(name, owner)
    finally:
        store.close()
