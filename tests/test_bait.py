"""BAIT's greedy selection core (cached Woodbury updates) against a from-scratch reference, and the strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import activelab
from activelab.errors import ActivelabError
from activelab.strategies.bait import Bait, bait_core, bait_select, pool_fisher
from activelab.strategies.fishermask import FisherMaskStrategy

from .bait_reference import bait_select_reference
from .conftest import TinyNet, make_pool, run_strategy


def _problem(seed: int, n: int = 40, c: int = 3, k: int = 9, n_labeled: int = 6):
    rng = np.random.default_rng(seed)
    # heterogeneous scales and a decaying spectrum, like real Fisher embeddings
    v = rng.normal(size=(n, c, k)) * rng.exponential(size=(n, 1, 1)) * (1.0 / np.arange(1, k + 1)) ** 0.5
    lab = rng.normal(size=(n_labeled, c, k))
    i_l = np.einsum("nck,ncl->kl", lab, lab) / max(1, n_labeled)
    f_u = (np.einsum("nck,ncl->kl", v, v) + n_labeled * i_l) / (n + n_labeled)
    return v, f_u, (i_l if n_labeled else None), n_labeled


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_picks_what_the_reference_picks(prune, seed):
    v, f_u, i_l, n_l = _problem(seed, n_labeled=[0, 6, 30][seed])
    lam = [1.0, 0.3, 2.0][seed]
    result = bait_core(v, f_u, i_l, n_l, budget=7, lam=lam, prune=prune)
    ref, ref_inv = bait_select_reference(v, f_u, i_l, n_l, budget=7, lam=lam, prune=prune)
    np.testing.assert_array_equal(result.positions, ref)  # same picks, same order
    np.testing.assert_allclose(result.m_inv, ref_inv, rtol=1e-9, atol=1e-12)
    assert len(result.forward) == (14 if prune else 7)
    if prune:
        assert sorted(result.positions.tolist() + result.removed.tolist()) == sorted(result.forward.tolist())


def test_pruning_changes_the_batch_on_some_problem():
    changed = 0
    for seed in range(6):
        v, f_u, i_l, n_l = _problem(seed)
        a = bait_select(v, f_u, i_l, n_l, 6, prune=True)
        b = bait_select(v, f_u, i_l, n_l, 6, prune=False)
        changed += set(a.tolist()) != set(b.tolist())
    assert changed > 0


def test_woodbury_inverse_matches_a_direct_inverse():
    v, f_u, i_l, n_l = _problem(3, n=30, c=4, k=11, n_labeled=10)
    b = 5
    result = bait_core(v, f_u, i_l, n_l, b, lam=0.7, prune=True)
    scale2 = b / (n_l + b)
    m = 0.7 * np.eye(11) + (n_l / (n_l + b)) * i_l
    for j in result.positions:
        m += scale2 * v[j].T @ v[j]
    np.testing.assert_allclose(result.m_inv, np.linalg.inv(m), rtol=1e-9, atol=1e-12)


def test_one_dimensional_problem_picks_the_largest_embeddings_first():
    """C = K = 1, no labels, F = f: t(x) = v^2 f / (m (m + v^2)) grows with v^2, so the first pick is the largest |v|
    and after adding it, m grows but the order of the rest is unchanged."""
    v = np.array([0.5, -3.0, 1.0, 2.0, -0.1])[:, None, None]
    picks = bait_select(v, np.array([[1.0]]), None, 0, 3, prune=False)
    np.testing.assert_array_equal(picks, [1, 3, 2])


def test_float32_products_pick_the_same_batch():
    v, f_u, i_l, n_l = _problem(4, n=60, c=3, k=10)
    a = bait_select(v, f_u, i_l, n_l, 8)
    b = bait_select(v.astype(np.float32), f_u, i_l, n_l, 8)
    np.testing.assert_array_equal(a, b)


def test_whole_candidate_set_and_input_errors():
    v, f_u, i_l, n_l = _problem(0, n=5)
    np.testing.assert_array_equal(bait_select(v, f_u, i_l, n_l, 5), np.arange(5))
    with pytest.raises(ActivelabError, match="budget"):
        bait_core(v, f_u, i_l, n_l, 6)
    with pytest.raises(ActivelabError, match=r"\(N, C, K\)"):
        bait_core(v[0], f_u, i_l, n_l, 2)
    with pytest.raises(ActivelabError, match="pool Fisher"):
        bait_core(v, f_u[:-1], i_l, n_l, 2)
    bad = v.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ActivelabError, match="NaN"):
        bait_core(bad, f_u, i_l, n_l, 2)
    with pytest.raises(ActivelabError, match="lam"):
        bait_core(v, f_u, i_l, n_l, 2, lam=0.0)


def test_pool_fisher_weights_the_unlabeled_estimate_by_the_pool_size():
    cand_sum, lab_sum = np.eye(2) * 10.0, np.eye(2) * 6.0
    f_u, i_l = pool_fisher(cand_sum, n_candidates_used=5, n_unlabeled=20, labeled_gram_sum=lab_sum, n_labeled=3)
    np.testing.assert_allclose(i_l, np.eye(2) * 2.0)
    np.testing.assert_allclose(f_u, np.eye(2) * (20 * 2.0 + 3 * 2.0) / 23)
    f_u, i_l = pool_fisher(cand_sum, 5, 5, np.zeros((2, 2)), 0)
    assert i_l is None
    np.testing.assert_allclose(f_u, np.eye(2) * 2.0)


def test_the_bait_subset_is_seeded_and_never_smaller_than_twice_the_budget():
    from activelab.strategies.base import candidate_subset

    bait = Bait(subset=10)
    assert bait.subsample_size(4) == 10 and bait.subsample_size(30) == 60  # room for 2b forward picks
    assert Bait(subset=None).subsample_size(4) is None
    a = candidate_subset(100, bait.subsample_size(4), 4, np.random.default_rng(0))
    np.testing.assert_array_equal(a, candidate_subset(100, 10, 4, np.random.default_rng(0)))
    assert not np.array_equal(a, candidate_subset(100, 10, 4, np.random.default_rng(1)))
    assert np.all(np.diff(a) > 0) and len(a) == 10
    np.testing.assert_array_equal(
        candidate_subset(100, bait.subsample_size(60), 60, np.random.default_rng(0)), np.arange(100)
    )
    np.testing.assert_array_equal(candidate_subset(8, 10, 4, np.random.default_rng(0)), np.arange(8))


def _trained_tiny() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.fc2.weight.mul_(3.0)
    return model


def test_fishermask_with_a_last_layer_mask_picks_what_bait_picks():
    """pct small enough that K < |W_last|: the mask is the classifier weight, and FisherMask's autograd
    embeddings must then reproduce BAIT's closed form, hence its batch."""
    pool, labeled = make_pool(n=50), np.arange(0, 50, 5)
    common = {"subset": None, "lam": 1.0, "prune": True}
    a = activelab.select("bait", _trained_tiny(), pool, labeled=labeled, budget=6, seed=1, **common)
    info: dict = {}
    strategy = FisherMaskStrategy(pct=0.001, fisher_samples=16, **common)
    b = run_strategy(strategy, _trained_tiny(), pool, labeled, 6, np.random.default_rng(1), info=info)
    assert info["fishermask_last_layer_only"] and info["fishermask_mask_size"] == 4 * 12
    np.testing.assert_array_equal(a, b)


def test_fishermask_mask_size_follows_pct():
    pool, labeled = make_pool(n=50), np.arange(0, 50, 5)
    info: dict = {}
    strategy = FisherMaskStrategy(pct=0.1, fisher_samples=16, subset=None)
    run_strategy(strategy, _trained_tiny(), pool, labeled, 6, np.random.default_rng(0), info=info)
    n_params = sum(p.numel() for p in TinyNet().parameters())
    assert info["fishermask_mask_size"] == int(0.1 * n_params)
    assert info["fishermask_mask_counts"]["fc2.weight"] == 48 and not info["fishermask_last_layer_only"]


@pytest.mark.parametrize("name", ["bait", "fishermask"])
def test_a_query_that_cannot_fit_in_memory_is_refused_up_front(name, monkeypatch):
    """With less memory available than the embeddings and K x K matrices need, the query stops before the
    expensive work with the sizes in the message; with enough (or unknown) memory it runs."""
    import activelab.inference.fisher as fisher
    import activelab.memory as memory

    pool, labeled = make_pool(n=50), np.arange(0, 50, 5)
    params = {"subset": None} if name == "bait" else {"subset": None, "pct": 0.05, "fisher_samples": 16}
    calls = []
    for fn in ("diagonal_fisher", "masked_fisher_embeddings", "last_layer_fisher_embeddings"):
        real = getattr(fisher, fn)
        monkeypatch.setattr(fisher, fn, lambda *a, real=real, fn=fn, **k: calls.append(fn) or real(*a, **k))
    # 40 candidates x C=4 x K=48 float64 + 6 K^2 float64 = 61,440 + 110,592 bytes
    assert memory.selection_memory_bytes(40, 4, 48, 8) == 40 * 4 * 48 * 8 + 6 * 48 * 48 * 8
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 50_000)
    with pytest.raises(ActivelabError, match=r"GiB.*available.*subset"):
        activelab.select(name, _trained_tiny(), pool, labeled=labeled, budget=6, seed=0, **params)
    assert not calls  # refused before the diagonal Fisher or any embedding was computed
    for have in (None, 2**30):
        monkeypatch.setattr(memory, "available_memory_bytes", lambda have=have: have)
        picked = activelab.select(name, _trained_tiny(), pool, labeled=labeled, budget=6, seed=0, **params)
        assert len(picked) == 6
