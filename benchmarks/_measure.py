"""Helpers shared by the benchmark scripts: timing, resident-memory readings (Linux /proc), the backward-pass
floor of layer-output gradients, and saving a result table.

The scripts run as ``python benchmarks/bench_*.py``, so this folder is on ``sys.path`` and they import this
module as ``_measure``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def clock(fn: Callable[[], T], repeats: int = 1) -> tuple[T, float, float]:
    """(result, CPU seconds, wall seconds) of ``fn()``, the fastest of ``repeats`` calls by CPU time. With one
    torch thread the process CPU time is what the work costs; wall time also counts waiting for a busy CPU."""
    best, out = (float("inf"), float("inf")), None
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        best = min(best, (time.process_time() - c, time.perf_counter() - w))
    return out, best[0], best[1]


def rss_mb() -> float:
    """The current resident set size of this process, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process, so that earlier work is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    """The peak resident set size (VmHWM) since the process started or since :func:`reset_peak_rss`, in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def backward_to_outputs(model, x, modules, objectives) -> list:
    """One forward pass of ``x`` with a hook adding a zero tensor (requiring grad) to each of ``modules``'
    outputs, then one backward pass per scalar of ``objectives(output)`` w.r.t. those zeros only: the gradients
    at the layer outputs and nothing else (no weight gradients), i.e. the least work of any exact method that
    needs them. Written independently of :mod:`activelab.inference.signals`, whose cost it bounds.
    Returns the objectives, detached."""
    import torch

    eps = []

    def add(_module, _inputs, output):
        e = torch.zeros_like(output, requires_grad=True)
        eps.append(e)
        return output + e

    handles = [m.register_forward_hook(add) for m in modules]
    try:
        with torch.enable_grad():
            targets = list(objectives(model(x)))
    finally:
        for handle in handles:
            handle.remove()
    for i, t in enumerate(targets):
        torch.autograd.grad(t, eps, retain_graph=i < len(targets) - 1, allow_unused=True)
    return [t.detach() for t in targets]


def backward_to_params(model, x, params, objectives) -> list:
    """One forward pass of ``x``, then one ordinary backward pass per scalar of ``objectives(output)`` w.r.t.
    ``params`` (the batch's summed gradients of those tensors, as a training step computes them): the
    "batched forward + backward pass" that a per-sample method is compared with. Returns the objectives,
    detached."""
    import torch

    with torch.enable_grad():
        targets = list(objectives(model(x)))
    for i, t in enumerate(targets):
        torch.autograd.grad(t, params, retain_graph=i < len(targets) - 1, allow_unused=True)
    return [t.detach() for t in targets]


def write_results(text: str, out: str | Path) -> None:
    """Print a result table and save it to ``out``."""
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text + "\n")
