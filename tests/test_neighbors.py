"""activelab.neighbors: exact nearest-neighbour searches (torch chunked, and faiss when installed) against brute
force."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from activelab.errors import ActivelabError
from activelab.neighbors import max_inner_products, min_sq_distances

BACKENDS = ["exact"] + (["faiss"] if importlib.util.find_spec("faiss") else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_brute_force(backend):
    rng = np.random.default_rng(0)
    p, c = rng.normal(size=(500, 7)), rng.normal(size=(37, 7))
    full = ((p[:, None, :] - c[None]) ** 2).sum(-1)
    dist, arg = min_sq_distances(p, c, backend=backend, block_elements=37 * 50)  # several blocks
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(arg, full.argmin(1))
    idx, val = max_inner_products(p, c, backend=backend, block_elements=37 * 64)
    np.testing.assert_array_equal(idx, (p @ c.T).argmax(1))
    np.testing.assert_allclose(val, (p @ c.T).max(1), rtol=1e-4, atol=1e-4)
    empty, none = min_sq_distances(p, np.zeros((0, 7)), backend=backend)
    assert np.isinf(empty).all() and (none == -1).all()


def test_bad_backend_is_a_clear_error(monkeypatch):
    import activelab.neighbors as knn

    with pytest.raises(ActivelabError, match="backend must be"):
        min_sq_distances(np.zeros((2, 2)), np.zeros((1, 2)), backend="annoy")
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    with pytest.raises(ActivelabError, match="pip install faiss-cpu"):
        min_sq_distances(np.zeros((2, 2)), np.zeros((1, 2)), backend="faiss")
    assert knn.resolve_backend("auto") == "exact"


def test_ball_sizes_and_best_inner_products_against_brute_force():
    import torch

    from activelab.neighbors import ball_sizes, best_inner_products

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    rows = np.array([0, 7, 299, 150])
    dist = np.sqrt(((x[rows, None, :].astype(np.float64) - x[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(ball_sizes(x, rows, 1.5, block_elements=600), (dist < 1.5).sum(1))
    # ties go to the lowest reference index, across chunk boundaries too
    ref = np.array([[1.0, 0], [0, 1], [1.0, 0], [0, 1]], dtype=np.float32)
    query = np.array([[2.0, 0], [0, 3]], dtype=np.float32)
    for chunk in (1, 2, 4):
        idx, val = best_inner_products(torch.from_numpy(query), torch.from_numpy(ref), chunk)
        assert idx.tolist() == [0, 1] and val.tolist() == [2.0, 3.0]
