"""TypiClust (Hacohen, Dekel & Weinshall, ICML 2022): the most typical point of each of the largest uncovered
k-means clusters, for label-free and low-budget selection.

Pure core :func:`typiclust_select`; the strategy class chooses the embeddings (see
:mod:`activelab.strategies._embedding`).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from ..neighbors import BLOCK_ELEMENTS, Backend, kmeans_labels, knn_sq_distances
from ._embedding import EmbeddingParams, embedding_inputs
from .base import Strategy, register


def typicality(x: np.ndarray, k: int, block_elements: int = BLOCK_ELEMENTS, backend: Backend = "exact") -> np.ndarray:
    """1 / (mean squared distance to the k nearest other rows + 1e-5), the authors' typicality."""
    return 1.0 / (knn_sq_distances(x, k, block_elements, backend).astype(np.float64).mean(axis=1) + 1e-5)


def typiclust_select(
    candidates: np.ndarray,
    labeled: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    *,
    max_clusters: int = 500,
    min_cluster_size: int = 5,
    k_neighbors: int = 20,
    minibatch_above: int = 50,
    cluster_labels: np.ndarray | None = None,
    block_elements: int = BLOCK_ELEMENTS,
    backend: Backend = "exact",
    info: dict | None = None,
) -> np.ndarray:
    """Positions of ``budget`` candidates chosen by TypiClust.

    Args:
        candidates: (N, d) embeddings of the unlabeled candidates; labeled: (L, d) of the labeled set (L may be 0).
        rng: seeds k-means.
        cluster_labels: (L + N,) cluster ids of ``[labeled; candidates]`` to use instead of k-means (tests).

    Steps (the authors' code): cluster labeled + candidates into min(L + budget, max_clusters) clusters (KMeans;
    MiniBatchKMeans above ``minibatch_above``); keep clusters of more than ``min_cluster_size`` points; order them
    by fewest labeled members, then largest; visit them in that order (cycling when the budget exceeds their
    number) and take the unpicked candidate of the cluster with the highest typicality, computed among the
    cluster's unpicked candidates with k = min(k_neighbors, their number // 2). Where the authors' code would
    fail (every kept cluster used up; no cluster large enough) the dropped clusters are visited next, then any
    candidate; ``info`` records it.
    """
    candidates = np.asarray(candidates, dtype=np.float32)
    labeled = np.asarray(labeled, dtype=np.float32).reshape(-1, candidates.shape[1])
    n, n_lab = len(candidates), len(labeled)
    if budget > n:
        raise ActivelabError(f"cannot pick {budget} samples from {n} candidates")
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    x = np.concatenate([labeled, candidates])
    n_clusters = min(n_lab + budget, max_clusters, len(x))
    if cluster_labels is None:
        cluster_labels = kmeans_labels(x, n_clusters, rng, minibatch_above, backend)
    cluster_labels = np.asarray(cluster_labels, dtype=np.int64)
    ids, sizes = np.unique(cluster_labels, return_counts=True)
    lab_counts = np.bincount(cluster_labels[:n_lab], minlength=ids.max() + 1)[ids]
    order = np.lexsort((ids, -sizes, lab_counts))  # fewest labeled, then largest, then lowest id
    kept = ids[order][sizes[order] > min_cluster_size]
    dropped = ids[order][sizes[order] <= min_cluster_size]
    # candidates still pickable, per cluster
    cand_labels = cluster_labels[n_lab:].copy()
    remaining = {int(c): np.flatnonzero(cand_labels == c) for c in ids}
    chosen: list[int] = []
    fallbacks = 0
    for phase in (kept, dropped):
        visit = [int(c) for c in phase]
        i = 0
        while len(chosen) < budget and visit:
            c = visit[i % len(visit)]
            members = remaining[c]
            if len(members) == 0:
                visit.remove(c)
                continue
            if len(members) == 1:
                best = 0
            else:
                k = max(1, min(k_neighbors, len(members) // 2))
                best = int(np.argmax(typicality(candidates[members], k, block_elements, backend)))
            chosen.append(int(members[best]))
            remaining[c] = np.delete(members, best)
            fallbacks += phase is dropped
            i += 1
    if info is not None:
        info["typiclust_clusters"] = int(len(ids))
        info["typiclust_clusters_kept"] = int(len(kept))
        if fallbacks:
            info["typiclust_from_small_clusters"] = int(fallbacks)
    return np.asarray(chosen, dtype=np.int64)


class TypiClustParams(EmbeddingParams):
    max_clusters: int = Field(500, ge=1, description="clusters: min(|L| + budget, max_clusters)")
    min_cluster_size: int = Field(5, ge=0, description="clusters with at most this many points are skipped")
    k_neighbors: int = Field(20, ge=1, description="k of the typicality (capped at half the cluster)")
    backend: Backend = Field(
        "exact", description="'exact': scikit-learn k-means, chunked torch kNN; 'faiss' (if installed): faiss for both"
    )


@register
class TypiClust(Strategy):
    """TypiClust (Hacohen, Dekel & Weinshall, "Active Learning on a Budget: Opposite Strategies Suit High and Low
    Budgets", ICML 2022): for each of the largest uncovered k-means clusters, its most typical point
    (typicality = 1 / mean squared distance to the k nearest neighbours within the cluster).

    Embeddings: the model's penultimate features (``embedding: model``; in experiments with ``init: rotation``
    this is the rotation-pretrained backbone at the first round) or the array passed to ``select(...,
    embeddings=...)`` (``embedding: user``), L2-normalised as the authors normalise their SimCLR features.
    Label-free: it needs no trained classifier, so it also serves the first round.

    Complexity: k-means on L + N points, O((L + N)·k·d) per iteration; typicality within each visited cluster,
    O(|cluster|^2·d) time in distance blocks of ``BLOCK_ELEMENTS`` entries (never N x N), O(|cluster|·k) memory.
    Deviations from the authors' code: k-means is seeded from the round's generator (theirs is unseeded) with
    n_init=1; the kNN is exact chunked torch (theirs: faiss on the GPU; ``backend: faiss`` uses faiss here, for the
    k-means too); when
    every kept cluster is used up (budget above the points they hold), the small clusters and then any candidate
    are used where theirs fails. Squared distances as theirs (faiss ``IndexFlatL2``; the paper writes the plain
    L2 distance). The per-class counts of its picks are recorded in experiments (it favours dense regions).
    """

    name = "typiclust"
    Params = TypiClustParams
    outputs = ("embeddings",)
    example_params: dict = {}

    def query(self, ctx, budget, rng):
        p: TypiClustParams = self.params
        cand, lab = embedding_inputs(ctx, p.embedding)
        return typiclust_select(
            cand,
            lab,
            budget,
            rng,
            max_clusters=p.max_clusters,
            min_cluster_size=p.min_cluster_size,
            k_neighbors=p.k_neighbors,
            backend=p.backend,
            info=ctx.info,
        )
