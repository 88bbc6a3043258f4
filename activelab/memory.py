"""Memory guards: refuse, before any expensive work, a computation whose arrays cannot fit in the memory
available now, with the sizes and what to change (the alternative is the kernel killing the process)."""

from __future__ import annotations

from .errors import ActivelabError


def selection_memory_bytes(n: int, c: int, k: int, itemsize: int) -> int:
    """Peak memory of one BAIT / FisherMask query, estimated: the candidates' embeddings (N C K of ``itemsize``)
    plus about six K x K float64 matrices alive at once (the Gram sums, F_U, I_L, M^-1 and its update)."""
    return n * c * k * itemsize + 6 * k * k * 8


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_selection_memory(strategy: str, n: int, c: int, k: int, itemsize: int) -> None:
    """Refuse, before any expensive work, a query whose arrays cannot fit in the memory available now, with
    the sizes and what to change (the alternative is the kernel killing the worker mid-query)."""
    need, have = selection_memory_bytes(n, c, k, itemsize), available_memory_bytes()
    if have is None or need <= have:
        return
    gib = 2.0**30
    raise ActivelabError(
        f"{strategy}: a query on N={n:,} candidates with C={c} classes and K={k:,} embedding dimensions needs "
        f"about {need / gib:.1f} GiB (embeddings N x C x K: {n * c * k * itemsize / gib:.1f} GiB; K x K matrices: "
        f"{6 * k * k * 8 / gib:.1f} GiB), but {have / gib:.1f} GiB is available. Lower K (fishermask: pct), "
        "the candidate subset (subset), or use precision: float32; or run on a machine with more memory."
    )


def check_memory(what: str, need_bytes: float, detail: str, advice: str) -> None:
    """Refuse ``what`` up front when ``need_bytes`` exceed the memory available now (unknown: allowed)."""
    have = available_memory_bytes()
    if have is None or need_bytes <= have:
        return
    gib = 2.0**30
    raise ActivelabError(
        f"{what} needs about {need_bytes / gib:.1f} GiB ({detail}), but {have / gib:.1f} GiB is available: {advice}"
    )
