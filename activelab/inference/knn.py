"""Nearest-neighbour searches for the diverse strategies, exact, with an optional faiss (CPU) backend.

- :func:`min_sq_distances`: each point's squared Euclidean distance to its nearest centre (core-set's start
  from the labeled set).
- :func:`max_inner_products`: each query's most similar reference row by dot product (FK's nearest labels).

``backend="torch"`` runs chunked torch matmuls (no N x M matrix); ``backend="faiss"`` uses faiss's exact flat
indexes (``IndexFlatL2`` / ``IndexFlatIP``; ``pip install faiss-cpu``); ``"auto"`` (default) uses faiss when
it is installed and torch otherwise. Both are exact up to float32 rounding, so the nearest neighbour may
differ where two candidates are within rounding of each other. Memory: O(N + chunk x M) either way.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import torch

from ..errors import ActivelabError

Backend = Literal["auto", "torch", "faiss"]
BLOCK_ELEMENTS = 1 << 24


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _resolve(backend: Backend) -> str:
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise ActivelabError("backend='faiss' needs faiss: pip install faiss-cpu (or use backend='torch')")
    if backend not in ("torch", "faiss"):
        raise ActivelabError(f"backend must be 'auto', 'torch' or 'faiss'; got {backend!r}")
    return backend


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def min_sq_distances(points, centres, backend: Backend = "auto", block_elements: int = BLOCK_ELEMENTS):
    """(N,) float32 squared distance of each of ``points`` (N, d) to its nearest row of ``centres`` (M, d), and
    (N,) int64 the index of that centre. ``inf`` / -1 when there are no centres."""
    p, c = _f32(points), _f32(centres)
    n = len(p)
    if len(c) == 0 or n == 0:
        return np.full(n, np.inf, dtype=np.float32), np.full(n, -1, dtype=np.int64)
    if _resolve(backend) == "faiss":
        import faiss

        index = faiss.IndexFlatL2(c.shape[1])
        index.add(c)
        dist, idx = index.search(p, 1)
        return np.maximum(dist[:, 0], 0), idx[:, 0].astype(np.int64)
    pt, ct = torch.from_numpy(p), torch.from_numpy(c)
    c_sq = (ct * ct).sum(1)
    best = torch.full((n,), float("inf"))
    arg = torch.full((n,), -1, dtype=torch.int64)
    rows = max(1, block_elements // len(c))
    for r in range(0, n, rows):
        block = pt[r : r + rows]
        d = torch.addmm(c_sq.unsqueeze(0), block, ct.T, alpha=-2) + (block * block).sum(1, keepdim=True)
        best[r : r + rows], arg[r : r + rows] = d.min(dim=1)
    return best.clamp_(min=0).numpy(), arg.numpy()


def max_inner_products(query, reference, backend: Backend = "auto", block_elements: int = BLOCK_ELEMENTS):
    """(N,) int64 index of the row of ``reference`` with the largest dot product with each row of ``query``,
    and (N,) float32 that product."""
    q, r = _f32(query), _f32(reference)
    if len(r) == 0:
        raise ActivelabError("max_inner_products needs at least one reference row")
    if _resolve(backend) == "faiss":
        import faiss

        index = faiss.IndexFlatIP(r.shape[1])
        index.add(r)
        val, idx = index.search(q, 1)
        return idx[:, 0].astype(np.int64), val[:, 0]
    qt, rt = torch.from_numpy(q), torch.from_numpy(r)
    rows = max(1, block_elements // len(r))
    idx = torch.empty(len(q), dtype=torch.int64)
    val = torch.empty(len(q))
    for s in range(0, len(q), rows):
        val[s : s + rows], idx[s : s + rows] = (qt[s : s + rows] @ rt.T).max(dim=1)
    return idx.numpy(), val.numpy()
