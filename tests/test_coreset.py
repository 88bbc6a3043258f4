"""Core-set (greedy k-center): picks equal a naive dense-matrix k-center; chunked distances equal dense ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

import activelab
from activelab.errors import ActivelabError
from activelab.inference.forward import forward_pass
from activelab.neighbors import min_sq_distances
from activelab.strategies.coreset import kcenter_greedy

from .conftest import TinyNet, make_pool


def naive_kcenter(points: np.ndarray, labeled: np.ndarray, budget: int, first: int | None = None) -> list[int]:
    """Textbook greedy k-center on the full (N + L) x (N + L) distance matrix, in float64."""
    everything = np.concatenate([points, labeled]).astype(np.float64)
    dist = cdist(everything, everything)  # dense, quadratic memory
    n = len(points)
    centres = list(range(n, n + len(labeled)))
    picks: list[int] = []
    if not centres:
        picks.append(first)
        centres.append(first)
    while len(picks) < budget:
        to_centres = dist[:n][:, centres].min(axis=1)
        picks.append(int(np.argmax(to_centres)))
        centres.append(picks[-1])
    return picks


def _embeddings(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("n_labeled", [0, 1, 17])
def test_greedy_equals_naive_dense(n_labeled):
    points, labeled = _embeddings(150, 12, 0), _embeddings(n_labeled, 12, 1)
    rng = np.random.default_rng(7)
    first = int(np.random.default_rng(7).integers(150)) if n_labeled == 0 else None
    # tiny blocks force the chunked path through many row and column blocks
    picks = kcenter_greedy(points, labeled, 25, rng, block_elements=64)
    assert picks.tolist() == naive_kcenter(points, labeled, 25, first)
    assert len(set(picks.tolist())) == 25


def test_chunked_min_distances_equal_dense():
    points, centres = _embeddings(203, 9, 2), _embeddings(31, 9, 3)
    dense = (cdist(points.astype(np.float64), centres.astype(np.float64)) ** 2).min(axis=1)
    for block in (1, 50, 10_000):
        got = min_sq_distances(points, centres, block_elements=block)[0]
        np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4)


def test_picks_every_candidate_when_budget_equals_pool():
    points = _embeddings(20, 4, 4)
    picks = kcenter_greedy(points, _embeddings(3, 4, 5), 20, np.random.default_rng(0))
    assert sorted(picks.tolist()) == list(range(20))
    with pytest.raises(ActivelabError, match="cannot pick 21"):
        kcenter_greedy(points, np.zeros((0, 4)), 21, np.random.default_rng(0))


def test_duplicates_are_not_picked_twice():
    points = np.repeat(_embeddings(5, 3, 6), 4, axis=0)  # every point four times
    picks = kcenter_greedy(points, np.zeros((0, 3), np.float32), 8, np.random.default_rng(0))
    assert len(set(picks.tolist())) == 8
    assert len({tuple(points[i]) for i in picks[:5]}) == 5  # the five distinct points come first


@pytest.mark.parametrize("name", ["coreset", "kcenter"])
def test_strategy_uses_classifier_input_embeddings(name):
    torch.manual_seed(0)
    model, pool = TinyNet(), make_pool(n=60)
    labeled = np.arange(0, 60, 6)
    unlabeled = np.setdiff1d(np.arange(60), labeled)
    picked = activelab.select(name, model, pool, labeled=labeled, budget=6)
    emb = forward_pass(model, pool, np.arange(60), embeddings=True).embeddings
    expected = unlabeled[naive_kcenter(emb[unlabeled], emb[labeled], 6)]
    np.testing.assert_array_equal(picked, expected)


def test_no_labeled_start_is_seeded():
    torch.manual_seed(0)
    model, pool = TinyNet(), make_pool(n=40)
    a = activelab.select("coreset", model, pool, budget=5, seed=1)
    b = activelab.select("coreset", model, pool, budget=5, seed=1)
    np.testing.assert_array_equal(a, b)
    emb = forward_pass(model, pool, np.arange(40), embeddings=True).embeddings
    rng = np.random.default_rng(1)
    rng.integers(2**31)  # select() seeds torch from the generator first
    first = int(rng.integers(40))
    assert a.tolist() == naive_kcenter(emb, np.zeros((0, emb.shape[1])), 5, first)


def test_subset_embeds_and_selects_only_the_seeded_subset():
    torch.manual_seed(0)
    model, pool = TinyNet(), make_pool(n=60)
    labeled = np.arange(0, 60, 6)
    unlabeled = np.setdiff1d(np.arange(60), labeled)
    picked = activelab.select("coreset", model, pool, labeled=labeled, budget=4, subset=20, seed=2)
    rng = np.random.default_rng(2)
    rng.integers(2**31)  # select() seeds torch from the generator first
    subset = unlabeled[np.sort(rng.choice(len(unlabeled), size=20, replace=False))]
    emb = forward_pass(model, pool, np.arange(60), embeddings=True).embeddings
    np.testing.assert_array_equal(picked, subset[naive_kcenter(emb[subset], emb[labeled], 4)])
