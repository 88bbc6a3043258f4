"""BASE, Bengar et al. and minority_first cores against independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from activelab.strategies.balance import base_select, bengar_select, boundary_distances, minority_first_select


def test_boundary_distances_are_point_to_hyperplane_distances():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3)), rng.normal(size=4)
    h = rng.normal(size=(30, 3))
    z = h @ w.T + b
    d = boundary_distances(z, w)
    for i, c in itertools.product(range(30), range(4)):
        p = z[i].argmax()
        if c != p:
            # distance from h to the plane (w_p - w_c) . x + (b_p - b_c) = 0
            normal = w[p] - w[c]
            want = abs(normal @ h[i] + b[p] - b[c]) / np.linalg.norm(normal)
            assert d[i, c] == pytest.approx(want)
        else:
            others = [abs((w[p] - w[k]) @ h[i] + b[p] - b[k]) / np.linalg.norm(w[p] - w[k]) for k in range(4) if k != p]
            assert d[i, c] == pytest.approx(min(others))


def test_base_gives_each_class_its_share_of_closest_points():
    rng = np.random.default_rng(1)
    dist = rng.random((50, 3))
    picks = base_select(dist, 9, rng)
    assert len(set(picks.tolist())) == 9
    # classes take turns: pick t belongs to class t % 3 and is its closest point not picked before
    taken = set()
    for t, j in enumerate(picks):
        k = t % 3
        free = [i for i in range(50) if i not in taken]
        assert j == min(free, key=lambda i: dist[i, k])
        taken.add(int(j))


def _bengar_objective(probs, counts, z, lam):
    u = (probs * np.log(probs)).sum(1)
    omega = np.maximum(0, (counts.sum() + z.sum()) / probs.shape[1] - counts)
    return z @ u + lam * np.abs(probs.T @ z - omega).sum()


def test_bengar_lp_matches_the_exhaustive_optimum_on_a_small_pool():
    rng = np.random.default_rng(2)
    hits = 0
    for _trial in range(5):
        logits = rng.normal(size=(12, 3)) * 2
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        counts = np.array([6, 1, 0])
        picks, notes = bengar_select(probs, counts, 4, lam=0.6)
        z = np.zeros(12)
        z[picks] = 1
        best = min(
            _bengar_objective(probs, counts, np.isin(np.arange(12), s).astype(float), 0.6)
            for s in itertools.combinations(range(12), 4)
        )
        got = _bengar_objective(probs, counts, z, 0.6)
        assert notes["lp_objective"] <= best + 1e-7  # the relaxation is a lower bound
        assert got >= best - 1e-9
        hits += got <= best + 1e-9
    assert hits >= 3  # rounding the LP recovers the exact optimum on most small problems


def test_bengar_balances_towards_the_missing_classes():
    probs = np.full((40, 2), 0.5)
    probs[:20] = [0.9, 0.1]
    probs[20:] = [0.1, 0.9]
    picks, _ = bengar_select(probs, np.array([10, 0]), 10, lam=5.0)
    assert (picks >= 20).all()


def test_minority_first_labels_the_least_labeled_classes_first():
    labels = np.array([0] * 30 + [1] * 5 + [2] * 3)
    picks = minority_first_select(labels, np.array([4, 1, 0]), 12, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[picks], minlength=3), [4, 5, 3])
    # water filling from (4, 1, 0): class 2 runs out at 3, class 1 reaches 6, class 0 takes the rest -> (8, 6, 3)
