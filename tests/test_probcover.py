"""ProbCover against brute-force coverage on dense distances, and the purity rule on a case with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from activelab.errors import ActivelabError
from activelab.neighbors import kmeans_labels, l2_normalize, radius_graph
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


def _blobs(n=400, d=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d)) * 1.5
    return l2_normalize(centres[rng.integers(8, size=n)] + rng.normal(size=(n, d)) * 0.5)


def test_one_pass_scan_equals_separate_passes():
    from activelab.neighbors import nearest_other_cluster_sq, purity_scan, shrink_graph

    x = _blobs()
    labels = kmeans_labels(x, 4, np.random.default_rng(1))
    d_other, wide, wide_sq = purity_scan(x, labels, 0.6, block_elements=999)  # several row blocks
    # the same row blocks give bit-identical float32 distances (BLAS rounding depends on the block shape)
    np.testing.assert_array_equal(d_other, nearest_other_cluster_sq(x, labels, block_elements=999))
    for r in (0.6, 0.35, 0.1):
        assert (shrink_graph(wide, wide_sq, r) != radius_graph(x, r, block_elements=999)).nnz == 0
    assert purity_scan(x, labels, 0.6, max_edges=50)[1] is None  # over the cap: distances only


@pytest.mark.parametrize("force_second_pass", [False, True])
def test_purity_rule_picks_do_not_depend_on_the_pass_plan(monkeypatch, force_second_pass):
    import activelab.strategies.probcover as pc

    x = _blobs(500, seed=3)
    cand, lab = x[20:], x[:20]
    labels = kmeans_labels(x, 5, np.random.default_rng(2))
    # the two-pass reference: exact purity delta, then the graph at that delta
    delta, _ = purity_delta(x, labels, 0.95)
    want = reference_probcover(cand, lab, 15, delta)
    if force_second_pass:  # the bound from the row sample below the true delta
        monkeypatch.setattr(pc, "_upper_quantile_rank", lambda m, n, s: 0)
    info = {}
    got = probcover_select(cand, lab, 15, np.random.default_rng(0), cluster_labels=labels, info=info)
    np.testing.assert_array_equal(got[: len(want)], want)
    assert info["probcover_delta"] == pytest.approx(delta)
    assert info["probcover_passes"] == (2 if force_second_pass else 1)


def test_a_graph_too_big_is_refused_up_front_with_its_size(monkeypatch):
    import activelab.strategies.probcover as pc

    def no_full_pass(*args, **kwargs):
        raise AssertionError("the full pass ran before the refusal")

    monkeypatch.setattr(pc, "SAMPLE_ROWS", 100)
    monkeypatch.setattr(pc, "purity_scan", no_full_pass)
    monkeypatch.setattr(pc, "radius_graph", no_full_pass)
    x = _blobs(3000, seed=4)
    for kwargs in ({"delta": 0.8}, {"num_classes": 3}):
        with pytest.raises(ActivelabError, match=r"would hold about [\d,]+ edges .*MB.*max_edges = 1,000.*subset: \d+"):
            probcover_select(x, x[:0], 10, np.random.default_rng(0), max_edges=1000, **kwargs)


def test_too_many_points_is_refused_before_any_pass_and_subset_runs():
    from activelab.strategies import get_strategy

    from .conftest import make_pool, run_strategy
    from .test_strategy_contract import CountingNet

    pool = make_pool(60)
    model = CountingNet(pool)
    with pytest.raises(ActivelabError, match=r"N=60 labeled \+ candidate points .*hours of one CPU core.*subset: 30"):
        run_strategy(get_strategy("probcover")(max_points=40), model, pool, np.arange(10), 3, np.random.default_rng(0))
    assert model.seen.sum() == 0
    strategy = get_strategy("probcover")(max_points=40, subset=30)
    picks = run_strategy(strategy, model, pool, np.arange(10), 3, np.random.default_rng(0))
    assert len(set(picks.tolist())) == 3 and model.seen[10:].sum() == 30


def test_purity_delta_of_zero_is_refused():
    # duplicate points split across clusters: no positive radius keeps their balls pure
    x = l2_normalize(np.repeat(np.eye(4, dtype=np.float32), 10, axis=0))
    labels = np.arange(40) % 4  # every point shares its position with points of the other clusters
    with pytest.raises(ActivelabError, match="chose delta = 0"):
        probcover_select(x, x[:0], 3, np.random.default_rng(0), cluster_labels=labels)


def test_a_grid_delta_is_estimated_at_the_grid_value():
    x = _blobs(3000, seed=5)
    labels = kmeans_labels(x, 3, np.random.default_rng(0))
    exact, _ = purity_delta(x, labels, 0.95)
    small = exact / 8
    edges = radius_graph(x, small).nnz
    # the graph at the grid value fits; at the exact purity delta it would not
    assert radius_graph(x, exact).nnz > 4 * edges
    info = {}
    probcover_select(
        x, x[:0], 5, np.random.default_rng(0), cluster_labels=labels, deltas=[small], max_edges=2 * edges, info=info
    )
    assert info["probcover_delta"] == pytest.approx(small) and info["probcover_edges"] == edges
