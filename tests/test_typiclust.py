"""TypiClust against a slow reference written from the paper and the authors' code (dense float64 distances)."""

from __future__ import annotations

import numpy as np
import pytest

from activelab.neighbors import knn_sq_distances, l2_normalize
from activelab.strategies.typiclust import typiclust_select


def reference_typiclust(cand, lab, budget, labels, min_size=5, k_nn=20):
    """Dense re-statement: order clusters (fewest labeled, largest), skip small ones, take the most typical
    unpicked candidate per visited cluster, typicality from dense squared distances."""
    x = np.concatenate([lab, cand]).astype(np.float64)
    n_lab = len(lab)
    clusters = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        clusters.append((int((members < n_lab).sum()), -len(members), int(c), len(members)))
    clusters.sort()
    order = [c for _, _, c, size in clusters if size > min_size]
    free = np.ones(len(x), dtype=bool)
    free[:n_lab] = False
    picks = []
    for i in range(budget):
        c = order[i % len(order)]
        members = [j for j in range(len(x)) if labels[j] == c and free[j]]
        k = min(k_nn, len(members) // 2)
        best, best_t = None, -np.inf
        for j in members:
            d = sorted(float(np.sum((x[j] - x[o]) ** 2)) for o in members if o != j)
            t = 1.0 / (np.mean(d[:k]) + 1e-5)
            if t > best_t:
                best, best_t = j, t
        picks.append(best - n_lab)
        free[best] = False
    return np.array(picks)


def _blobs(rng, n, d=6, centers=4, spread=0.3):
    means = rng.normal(size=(centers, d)) * 2
    which = rng.integers(centers, size=n)
    return (means[which] + spread * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("n_lab,budget", [(0, 5), (7, 9), (3, 25)])
def test_matches_reference_with_given_clusters(n_lab, budget):
    rng = np.random.default_rng(n_lab)
    x = l2_normalize(_blobs(rng, 160))
    labels = rng.integers(8, size=len(x))  # includes cycling (budget 25 > 8 clusters) and labeled clusters
    labels[:4] = 9  # a cluster of 4 points: skipped
    lab, cand = x[:n_lab], x[n_lab:]
    got = typiclust_select(cand, lab, budget, np.random.default_rng(0), cluster_labels=labels)
    want = reference_typiclust(cand, lab, budget, labels)
    np.testing.assert_array_equal(got, want)


def test_kmeans_path_picks_dense_points_of_distinct_clusters():
    rng = np.random.default_rng(3)
    x = l2_normalize(_blobs(rng, 400, centers=5, spread=0.15))
    info: dict = {}
    a = typiclust_select(x, x[:0], 5, np.random.default_rng(1), info=info)
    b = typiclust_select(x, x[:0], 5, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 5 and info["typiclust_clusters"] == 5
    # each pick is the reference's most typical point of its own k-means cluster
    from activelab.neighbors import kmeans_labels

    labels = kmeans_labels(x, 5, np.random.default_rng(1))
    assert len(set(labels[a].tolist())) == 5
    np.testing.assert_array_equal(a, reference_typiclust(x, x[:0], 5, labels))


def test_budget_beyond_kept_clusters_still_fills_with_distinct_candidates():
    rng = np.random.default_rng(5)
    x = _blobs(rng, 30)
    labels = np.repeat(np.arange(5), 6)  # five clusters of 6 points
    labels[:12] = np.repeat([5, 6, 7], 4)  # three clusters of 4: dropped
    info: dict = {}
    got = typiclust_select(x, x[:0], 28, np.random.default_rng(0), cluster_labels=labels, info=info)
    assert len(set(got.tolist())) == 28
    assert info["typiclust_from_small_clusters"] == 28 - 18  # 3 kept clusters x 6 points, then the small ones


def test_faiss_backend_same_neighbours_and_picks():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    x = l2_normalize(_blobs(rng, 300))
    np.testing.assert_allclose(knn_sq_distances(x, 7, backend="faiss"), knn_sq_distances(x, 7), atol=1e-5)
    labels = rng.integers(6, size=len(x))
    a = typiclust_select(x, x[:0], 10, np.random.default_rng(0), cluster_labels=labels, backend="faiss")
    b = typiclust_select(x, x[:0], 10, np.random.default_rng(0), cluster_labels=labels)
    np.testing.assert_array_equal(a, b)
    # faiss k-means too: seeded, and each pick the reference's most typical point of its faiss cluster
    from activelab.neighbors import kmeans_labels

    c = typiclust_select(x, x[:0], 6, np.random.default_rng(3), backend="faiss")
    np.testing.assert_array_equal(c, typiclust_select(x, x[:0], 6, np.random.default_rng(3), backend="faiss"))
    faiss_labels = kmeans_labels(x, 6, np.random.default_rng(3), backend="faiss")
    np.testing.assert_array_equal(c, reference_typiclust(x, x[:0], 6, faiss_labels))


def test_knn_is_chunked_and_exact():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(97, 5)).astype(np.float32)
    dense = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(dense, np.inf)
    want = np.sort(dense, axis=1)[:, :4]
    np.testing.assert_allclose(knn_sq_distances(x, 4, block_elements=300), want, rtol=1e-4, atol=1e-5)


def test_select_with_user_embeddings_uses_them_normalised():
    import activelab
    from activelab.errors import ActivelabError

    from .conftest import TinyNet, make_pool

    pool, labeled = make_pool(), np.arange(0, 60, 5)
    rng = np.random.default_rng(0)
    emb = _blobs(rng, len(pool)) * 3.0
    got = activelab.select("typiclust", TinyNet(), pool, labeled=labeled, budget=4, embeddings=emb, embedding="user")
    unlabeled = np.setdiff1d(np.arange(len(pool)), labeled)
    assert set(got.tolist()) <= set(unlabeled.tolist())
    # L2-normalised: a copy scaled by 4 (exact in floating point) gives the same picks; other embeddings give others
    scaled = activelab.select(
        "typiclust", TinyNet(), pool, labeled=labeled, budget=4, embeddings=emb * 4.0, embedding="user"
    )
    np.testing.assert_array_equal(got, scaled)
    other = activelab.select(
        "typiclust", TinyNet(), pool, labeled=labeled, budget=4, embeddings=emb[::-1].copy(), embedding="user"
    )
    assert not np.array_equal(got, other)
    with pytest.raises(ActivelabError, match="embedding='user' needs embeddings"):
        activelab.select("typiclust", TinyNet(), pool, labeled=labeled, budget=4, embedding="user")
