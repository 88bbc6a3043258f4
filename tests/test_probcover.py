"""ProbCover against brute-force coverage on dense distances, and the purity rule on a case with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from activelab.errors import ActivelabError
from activelab.strategies._neighbors import kmeans_labels, l2_normalize, radius_graph
from activelab.strategies.probcover import probcover_select, purity_delta


def reference_probcover(cand, lab, budget, delta):
    """Brute force: dense distances; each step takes the candidate whose ball holds the most uncovered points."""
    x = np.concatenate([lab, cand]).astype(np.float64)
    n_lab = len(lab)
    dist = np.sqrt(((x[:, None, :] - x[None]) ** 2).sum(-1))
    ball = dist < delta
    covered = ball[:n_lab].any(axis=0) if n_lab else np.zeros(len(x), bool)
    picks = []
    for _ in range(budget):
        gains = [(ball[j] & ~covered).sum() if j >= n_lab and j - n_lab not in picks else -1 for j in range(len(x))]
        best = int(np.argmax(gains))
        if gains[best] <= 0:
            break
        picks.append(best - n_lab)
        covered |= ball[best]
    return np.array(picks)


def _line(positions):
    """Points on a line embedded in 3-d (exact float32 distances)."""
    pts = np.zeros((len(positions), 3), dtype=np.float32)
    pts[:, 0] = positions
    return pts


@pytest.mark.parametrize("n_lab,budget,delta", [(0, 8, 0.5), (6, 10, 0.4), (3, 12, 0.7)])
def test_matches_brute_force(n_lab, budget, delta):
    rng = np.random.default_rng(n_lab)
    x = l2_normalize(rng.normal(size=(150, 4)) + np.repeat(rng.normal(size=(5, 4)) * 2, 30, axis=0))
    lab, cand = x[:n_lab], x[n_lab:]
    got = probcover_select(cand, lab, budget, np.random.default_rng(0), delta=delta)
    want = reference_probcover(cand, lab, budget, delta)
    np.testing.assert_array_equal(got[: len(want)], want)
    assert len(set(got.tolist())) == budget


def test_radius_graph_chunked_equals_dense():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(83, 3)).astype(np.float32)
    dense = np.sqrt(((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)) < 1.1
    g = radius_graph(x, 1.1, block_elements=200)
    np.testing.assert_array_equal(g.toarray().astype(bool), dense)
    with pytest.raises(ActivelabError, match="max_edges"):
        radius_graph(x, 1.1, max_edges=10)


def test_faiss_graph_and_picks_match_exact():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    x = l2_normalize(rng.normal(size=(200, 5)))
    g1, g2 = radius_graph(x, 0.8), radius_graph(x, 0.8, backend="faiss")
    assert (g1 != g2).nnz == 0
    a = probcover_select(x, x[:0], 9, np.random.default_rng(0), delta=0.8, backend="faiss")
    np.testing.assert_array_equal(a, probcover_select(x, x[:0], 9, np.random.default_rng(0), delta=0.8))


# Two clusters on a line: A at 0..9, B at 12..21. Distance to the other cluster: A at x -> 12 - x, B at y -> y - 9,
# so the sorted distances are 3, 3, 4, 4, ..., 12, 12 and purity(delta) = share of points with distance >= delta.
LINE = _line(np.r_[np.arange(10), np.arange(12, 22)])
LINE_CLUSTERS = np.r_[np.zeros(10, int), np.ones(10, int)]


@pytest.mark.parametrize("alpha,delta,pure", [(0.95, 3.0, 1.0), (0.9, 4.0, 0.9), (0.5, 8.0, 0.5)])
def test_purity_rule_known_answer(alpha, delta, pure):
    got_delta, got_purity = purity_delta(LINE, LINE_CLUSTERS, alpha)
    assert got_delta == pytest.approx(delta, abs=1e-5) and got_purity == pytest.approx(pure)
    # k-means with k = 2 finds the same two clusters, so the strategy's rule gives the same delta
    assert purity_delta(LINE, kmeans_labels(LINE, 2, np.random.default_rng(0)), alpha)[0] == pytest.approx(delta)


def test_purity_rule_on_a_grid():
    # purity on the grid: 1 -> 1.0, 2 -> 1.0, 3.5 -> 0.9, 5 -> 0.7; largest meeting 0.95 is 2
    assert purity_delta(LINE, LINE_CLUSTERS, 0.95, deltas=[5, 1, 3.5, 2]) == (2.0, 1.0)
    assert purity_delta(LINE, LINE_CLUSTERS, 0.99, deltas=[5, 3.5])[0] == 3.5  # none meets it: the smallest


def test_purity_delta_used_and_full_coverage_falls_back_to_random():
    info: dict = {}
    picks = probcover_select(LINE, LINE[:0], 5, np.random.default_rng(0), num_classes=2, info=info)
    assert info["probcover_delta"] == pytest.approx(3.0) and info["probcover_purity"] == 1.0
    # balls of radius 3 (open) hold 5 points on a grid of step 1: four picks cover all 20 points, the fifth is random
    assert info["probcover_coverage"] == 1.0 and info["probcover_random_after_full_coverage"] == 1
    np.testing.assert_array_equal(picks[:4], reference_probcover(LINE, LINE[:0], 5, 3.0))
