"""BADGE: factorised k-means++ against the materialised one, the gradient embedding, and the D^2 sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from activelab.errors import ActivelabError
from activelab.inference.forward import forward_pass
from activelab.strategies.badge import badge_factors, kmeans_pp_dense, kmeans_pp_factorised, materialise

from .conftest import TinyNet, make_pool


def _factors(seed: int, n: int = 300, c: int = 5, d: int = 7):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = np.maximum(rng.normal(size=(n, d)), 0.0)  # ReLU features
    return badge_factors(p, h)


@pytest.mark.parametrize("first", ["max_norm", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factorised_picks_what_materialised_picks(first, seed):
    a, h = _factors(seed)
    x = materialise(a, h, dtype=np.float64)
    fast = kmeans_pp_factorised(a, h, 40, np.random.default_rng(seed), first)
    slow = kmeans_pp_dense(x, 40, np.random.default_rng(seed), first)
    np.testing.assert_array_equal(fast, slow)
    assert len(set(fast.tolist())) == 40


def test_factorised_matches_on_a_larger_pool_with_float32_features():
    """Enough points and centres that the bound prunes and the class-sorted slices are used."""
    a, h = _factors(7, n=3000, c=10, d=24)
    h = h.astype(np.float32)
    fast = kmeans_pp_factorised(a, h, 150, np.random.default_rng(0))
    slow = kmeans_pp_dense(materialise(a, h, np.float64), 150, np.random.default_rng(0))
    np.testing.assert_array_equal(fast, slow)


def test_first_centre_is_the_largest_gradient_embedding():
    a, h = _factors(3)
    norms = np.linalg.norm(materialise(a, h, np.float64), axis=1)
    assert kmeans_pp_factorised(a, h, 1, np.random.default_rng(0))[0] == int(np.argmax(norms))


def test_next_centres_are_drawn_proportionally_to_squared_distance():
    """Points 0, 1, 3 on a line (a = [1], h = x): the first centre is 3 (largest norm); the next is point 0
    with probability 9 / (9 + 4), not 3 / (3 + 2) as it would be with unsquared distances."""
    a, h = np.ones((3, 1)), np.array([[0.0], [1.0], [3.0]])
    second = [kmeans_pp_factorised(a, h, 2, np.random.default_rng(s))[1] for s in range(3000)]
    assert set(second) == {0, 1}
    assert abs(np.mean(np.asarray(second) == 0) - 9 / 13) < 0.03


def test_duplicates_still_give_budget_distinct_points():
    a, h = np.ones((6, 2)), np.ones((6, 3))  # every embedding identical: all distances are zero
    out = kmeans_pp_factorised(a, h, 4, np.random.default_rng(0))
    assert len(set(out.tolist())) == 4


def test_gradient_embedding_is_the_cross_entropy_gradient_at_the_predicted_label():
    torch.manual_seed(0)
    model, pool = TinyNet().eval(), make_pool(n=10)
    idx = np.arange(10)
    out = forward_pass(model, pool, idx, embeddings=True)
    p = torch.softmax(torch.as_tensor(out.logits, dtype=torch.float64), 1).numpy()
    a, h = badge_factors(p, out.embeddings)
    emb = materialise(a, h, np.float64)
    for i in idx:
        x, _ = pool.batch(np.asarray([i]))
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1))
        (g,) = torch.autograd.grad(loss, model.fc2.weight)
        np.testing.assert_allclose(emb[i], -g.double().flatten().numpy(), rtol=1e-4, atol=1e-6)


def test_bad_inputs():
    a, h = _factors(0, n=5)
    with pytest.raises(ActivelabError, match="budget"):
        kmeans_pp_factorised(a, h, 6, np.random.default_rng(0))
    with pytest.raises(ActivelabError, match="first_center"):
        kmeans_pp_factorised(a, h, 2, np.random.default_rng(0), first="nope")
    with pytest.raises(ActivelabError, match="rows"):
        badge_factors(np.full((3, 2), 0.5), np.ones((4, 2)))
