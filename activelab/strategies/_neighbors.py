"""Bounded-memory neighbour computations on embeddings, shared by the label-free strategies (TypiClust,
ProbCover): L2 normalisation, k-means, k nearest neighbours, the delta-ball (radius) graph as a sparse CSR matrix,
and each point's distance to the nearest point of another cluster.

Every distance block holds at most ``block_elements`` entries (never an N x N matrix). Distances are squared
Euclidean, computed as ||a||^2 + ||b||^2 - 2 a.b in float32 (clamped at 0). ``backend="faiss"`` uses
``faiss.IndexFlatL2`` (exact search; an optional dependency) and gives the same neighbours up to float rounding.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import ActivelabError

Backend = Literal["exact", "faiss"]

#: Entries of one distance block (float32: 32 MB).
BLOCK_ELEMENTS = 2**23


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (float32; all-zero rows stay zero), as the TypiClust/ProbCover authors
    normalise their self-supervised features."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ActivelabError(f"embeddings must be (N, d); got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ActivelabError("embeddings contain NaN or inf; check the model or the embeddings you passed")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def kmeans_labels(
    x: np.ndarray, n_clusters: int, rng: np.random.Generator, minibatch_above: int = 50, backend: Backend = "exact"
) -> np.ndarray:
    """Cluster labels from scikit-learn's KMeans, or MiniBatchKMeans (batch 5000) above ``minibatch_above``
    clusters, as in the TypiClust authors' code; seeded from ``rng``. ``backend="faiss"``: ``faiss.Kmeans``
    (20 Lloyd iterations; much faster on large pools, a different local optimum)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n_clusters = int(min(n_clusters, len(x)))
    seed = int(rng.integers(2**31 - 1))
    if n_clusters <= 1:
        return np.zeros(len(x), dtype=np.int64)
    if backend == "faiss":
        faiss = _faiss()
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        km = faiss.Kmeans(x32.shape[1], n_clusters, niter=20, seed=seed % 2**30, verbose=False)
        km.train(x32)
        return km.index.search(x32, 1)[1][:, 0].astype(np.int64)
    if n_clusters <= minibatch_above:
        km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters=n_clusters, batch_size=5000, n_init=1, random_state=seed)
    return km.fit_predict(x).astype(np.int64)


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1).square_()


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ActivelabError(
            "backend='faiss' needs the faiss package: pip install faiss-cpu (or use 'exact')"
        ) from None
    return faiss


def _row_blocks(n_rows: int, n_cols: int, block_elements: int):
    rows = max(1, block_elements // max(1, n_cols))
    for r in range(0, n_rows, rows):
        yield r, min(n_rows, r + rows)


def _sq_block(x: torch.Tensor, x_sq: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    d = torch.addmm(x_sq.unsqueeze(0), x[r0:r1], x.T, alpha=-2)
    d += x_sq[r0:r1].unsqueeze(1)
    return d.clamp_(min=0)


def knn_sq_distances(
    x: np.ndarray, k: int, block_elements: int = BLOCK_ELEMENTS, backend: Backend = "exact"
) -> np.ndarray:
    """(N, k) squared distances from each row to its k nearest *other* rows, ascending. Needs k < N."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 0 < k < n:
        raise ActivelabError(f"k nearest neighbours need 0 < k < N; got k={k}, N={n}")
    if backend == "faiss":
        faiss = _faiss()
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        out = np.empty((n, k), dtype=np.float32)
        for r0, r1 in _row_blocks(n, k + 1, block_elements):
            dist, idx = index.search(x[r0:r1], k + 1)
            own = idx == np.arange(r0, r1)[:, None]
            # drop the row itself (or, if the search returned k + 1 others at distance 0, the last one)
            drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
            keep = np.ones_like(own)
            keep[np.arange(r1 - r0), drop] = False
            out[r0:r1] = np.maximum(dist[keep].reshape(r1 - r0, k), 0)
        return out
    xt = torch.from_numpy(x)
    x_sq = _squared_norms(xt)
    out = torch.empty((n, k), dtype=torch.float32)
    for r0, r1 in _row_blocks(n, n, block_elements):
        d = _sq_block(xt, x_sq, r0, r1)
        d[torch.arange(r1 - r0), torch.arange(r0, r1)] = float("inf")
        out[r0:r1] = torch.topk(d, k, dim=1, largest=False, sorted=True).values
    return out.numpy()


def radius_graph(
    x: np.ndarray,
    radius: float,
    block_elements: int = BLOCK_ELEMENTS,
    backend: Backend = "exact",
    max_edges: int | None = None,
) -> sp.csr_matrix:
    """Directed graph i -> j iff ||x_i - x_j|| < radius (self-loops included), as an (N, N) CSR pattern with
    int8 ones. Built in row blocks; raises if it would hold more than ``max_edges`` edges."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    r_sq = float(radius) ** 2
    indptr = np.zeros(n + 1, dtype=np.int64)
    cols: list[np.ndarray] = []
    total = 0

    def add(r0: int, counts: np.ndarray, idx: np.ndarray) -> None:
        nonlocal total
        total += len(idx)
        if max_edges is not None and total > max_edges:
            raise ActivelabError(
                f"the delta-ball graph would hold more than max_edges={max_edges} edges (delta={radius:.4g}): "
                "lower delta (or alpha for the purity rule), subsample the candidates, or raise max_edges"
            )
        indptr[r0 + 1 : r0 + 1 + len(counts)] = counts
        cols.append(idx.astype(np.int32))

    if backend == "faiss":
        faiss = _faiss()
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        for r0, r1 in _row_blocks(n, n, block_elements):
            lims, dist, idx = index.range_search(x[r0:r1], r_sq)
            # faiss keeps d < radius; order each row by column as the exact path does
            for i in range(r1 - r0):
                a, b = lims[i], lims[i + 1]
                order = np.argsort(idx[a:b], kind="stable")
                idx[a:b] = idx[a:b][order]
            add(r0, np.diff(lims), idx)
    else:
        xt = torch.from_numpy(x)
        x_sq = _squared_norms(xt)
        for r0, r1 in _row_blocks(n, n, block_elements):
            nz = torch.nonzero(_sq_block(xt, x_sq, r0, r1) < r_sq).numpy()  # row-major: sorted by row, column
            add(r0, np.bincount(nz[:, 0], minlength=r1 - r0), nz[:, 1])
    np.cumsum(indptr, out=indptr)
    indices = np.concatenate(cols) if cols else np.zeros(0, np.int32)
    if total < 2**31:
        indptr = indptr.astype(np.int32)
    return sp.csr_matrix((np.ones(len(indices), dtype=np.int8), indices, indptr), shape=(n, n))


def nearest_other_cluster_sq(
    x: np.ndarray, labels: np.ndarray, block_elements: int = BLOCK_ELEMENTS, backend: Backend = "exact"
) -> np.ndarray:
    """(N,) squared distance from each row to the nearest row with a different label (inf if there is none)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.asarray(labels)
    n = len(x)
    out = np.full(n, np.inf, dtype=np.float32)
    if backend == "faiss":
        faiss = _faiss()
        for c in np.unique(labels):
            inside, outside = labels == c, labels != c
            if not outside.any():
                continue
            index = faiss.IndexFlatL2(x.shape[1])
            index.add(np.ascontiguousarray(x[outside]))
            rows = np.flatnonzero(inside)
            for r0, r1 in _row_blocks(len(rows), 1, block_elements):
                dist, _ = index.search(np.ascontiguousarray(x[rows[r0:r1]]), 1)
                out[rows[r0:r1]] = np.maximum(dist[:, 0], 0)
        return out
    xt = torch.from_numpy(x)
    x_sq = _squared_norms(xt)
    lab = torch.from_numpy(labels.astype(np.int64))
    for r0, r1 in _row_blocks(n, n, block_elements):
        d = _sq_block(xt, x_sq, r0, r1)
        d.masked_fill_(lab[r0:r1].unsqueeze(1) == lab.unsqueeze(0), float("inf"))
        out[r0:r1] = d.min(dim=1).values.numpy()
    return out
