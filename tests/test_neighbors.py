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
