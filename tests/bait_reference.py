"""The slow, from-scratch BAIT greedy: the independent reference the fast core is tested against, and the
baseline of benchmarks/bench_bait.py."""

from __future__ import annotations

import numpy as np

from activelab.strategies.bait import _check_inputs, _counts


def bait_select_reference(
    v: np.ndarray,
    fisher_pool: np.ndarray,
    fisher_labeled: np.ndarray | None,
    n_labeled: int,
    budget: int,
    lam: float = 1.0,
    prune: bool = True,
    max_picks: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The slow, from-scratch BAIT greedy, for tests and benchmarks: every pick recomputes V_x M^-1 F M^-1 V_x^T
    for every candidate, with M^-1 inverted directly from M (no Woodbury). O(N C K^2) per pick.

    Returns (positions, M^-1). ``max_picks`` stops the forward pass early (for timing); then it returns the
    forward picks made so far.
    """
    _check_inputs(v, fisher_pool, fisher_labeled, budget)
    n, c, k = v.shape
    m = lam * np.eye(k)
    if fisher_labeled is not None and n_labeled > 0:
        m = m + (n_labeled / (n_labeled + budget)) * np.asarray(fisher_labeled, dtype=np.float64)
    vs = v.astype(np.float64) * np.sqrt(budget / (n_labeled + budget))
    f = np.asarray(fisher_pool, dtype=np.float64)

    def products(rows: np.ndarray, m_inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g, h = np.empty((len(rows), c, c)), np.empty((len(rows), c, c))
        for s in range(0, len(rows), 256):  # chunked only to bound memory
            vr = vs[rows[s : s + 256]]
            a = vr @ m_inv
            g[s : s + 256] = a @ np.swapaxes(vr, 1, 2)
            h[s : s + 256] = a @ f @ np.swapaxes(a, 1, 2)
        return g, h

    picked: list[int] = []
    n_forward = _counts(n, budget, prune) if max_picks is None else min(max_picks, _counts(n, budget, prune))
    for _ in range(n_forward):
        m_inv = np.linalg.inv(m)
        g, h = products(np.arange(n), m_inv)
        scores = np.einsum("nij,nji->n", h, np.linalg.inv(g + np.eye(c)))
        scores[picked] = -np.inf
        j = int(np.argmax(scores))
        picked.append(j)
        m = m + vs[j].T @ vs[j]
    if max_picks is not None:
        return np.asarray(picked, dtype=np.int64), np.linalg.inv(m)
    while len(picked) > budget:
        m_inv = np.linalg.inv(m)
        rows = np.asarray(picked, dtype=np.int64)
        g, h = products(rows, m_inv)
        scores = np.einsum("nij,nji->n", h, np.linalg.inv(g - np.eye(c)))
        out = int(rows[int(np.argmax(scores))])
        picked.remove(out)
        m = m - vs[out].T @ vs[out]
    return np.asarray(picked, dtype=np.int64), np.linalg.inv(m)
