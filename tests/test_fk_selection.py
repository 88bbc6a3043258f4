"""FK's pure selection functions against naive references, and the strategy's estimators end to end."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

import activelab
from activelab.errors import ActivelabError
from activelab.inference.descriptors import compute_descriptors
from activelab.neighbors import topk_inner_products
from activelab.strategies.base import get_strategy
from activelab.strategies.fisher_kernel import (
    FisherKernel,
    fk_select,
    kcenter_running_max,
    nearest_label_fn,
    rankwise_fill,
    similarity_vectors,
    standardise_segments,
)

from .conftest import TinyNet, make_pool, run_strategy

TAPS = ["conv1", "conv2", "fc1"]


# -- similarity ---------------------------------------------------------------------------------------------


def test_standardised_dot_is_n_minus_1_times_pearson_per_segment():
    rng = np.random.default_rng(0)
    segments = np.array([0, 3, 10, 30])
    a, b = rng.normal(size=(5, 30)) * 3 + 1, rng.normal(size=(4, 30))
    sa, sb = standardise_segments(a, segments), standardise_segments(b, segments)
    for i in range(5):
        for j in range(4):
            expected = sum(
                (hi - lo - 1) * np.corrcoef(a[i, lo:hi], b[j, lo:hi])[0, 1]
                for lo, hi in zip(segments[:-1], segments[1:], strict=True)
            )
            assert sa[i] @ sb[j] == pytest.approx(expected, rel=1e-4)
    # the sample std (ddof=1) is what makes the identity exact: the population std would give n * Pearson
    lo, hi = 3, 10
    pop = (a[0, lo:hi] - a[0, lo:hi].mean()) / a[0, lo:hi].std()
    assert pop @ pop == pytest.approx(hi - lo) and sa[0, lo:hi] @ sa[0, lo:hi] == pytest.approx(hi - lo - 1, rel=1e-5)
    # torch input gives the same numbers
    np.testing.assert_allclose(standardise_segments(torch.tensor(a), segments).numpy(), sa, rtol=1e-5, atol=1e-6)


def test_constant_segment_is_zero_not_nan():
    x = np.array([[1.0, 1.0, 1.0, 2.0]])
    out = standardise_segments(x, np.array([0, 3, 4]))
    np.testing.assert_array_equal(out, 0.0)


def test_similarity_vectors_sum_feature_and_fisher_terms():
    rng = np.random.default_rng(1)
    seg = np.array([0, 4, 9])
    z, g = rng.normal(size=(3, 9)), rng.normal(size=(3, 9))
    v = similarity_vectors(z, seg, g)
    rz = standardise_segments(z, seg) @ standardise_segments(z, seg).T
    rg = standardise_segments(g, seg) @ standardise_segments(g, seg).T
    np.testing.assert_allclose(v @ v.T, rz + rg, rtol=1e-5)


# -- selection ----------------------------------------------------------------------------------------------


def naive_kcenter(x, k, first):
    chosen = [first]
    for _ in range(1, k):
        best, best_val = None, np.inf
        for i in range(len(x)):
            if i in chosen:
                continue
            v = max(float(x[i] @ x[c]) for c in chosen)
            if v < best_val:
                best, best_val = i, v
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", range(4))
def test_running_max_kcenter_equals_naive(seed):
    x = np.random.default_rng(seed).normal(size=(40, 6)).astype(np.float32)
    picks = kcenter_running_max(x, 9, np.random.default_rng(seed))
    first = int(np.random.default_rng(seed).integers(40))
    assert picks.tolist() == naive_kcenter(x, 9, first)
    assert len(set(picks.tolist())) == 9


@pytest.mark.parametrize("backend", ["exact"] + (["faiss"] if importlib.util.find_spec("faiss") else []))
def test_topk_neighbours_chunked_equals_dense(backend):
    rng = np.random.default_rng(0)
    pool, centres = rng.normal(size=(103, 5)).astype(np.float32), rng.normal(size=(7, 5)).astype(np.float32)
    sims = pool @ centres.T
    for chunk in (10, 64, 1000):
        vals, idx, max_sim = topk_inner_products(pool, centres, 6, backend, chunk)
        np.testing.assert_array_equal(idx, np.argsort(-sims, axis=0)[:6])
        np.testing.assert_allclose(vals, -np.sort(-sims, axis=0)[:6], rtol=1e-5)
        np.testing.assert_allclose(max_sim, sims.max(1), rtol=1e-5)


def test_rankwise_fill_hand_worked():
    # 3 centres, top-2 each. rank 1: pool 5 (0.9), 5 (0.8), 2 (0.95) -> by similarity: 2, 5, (5 dup)
    # rank 2: 7 (0.7), 2 (0.6), 4 (0.75) -> 4, 7, (2 dup)
    values = np.array([[0.9, 0.8, 0.95], [0.7, 0.6, 0.75]])
    indices = np.array([[5, 5, 2], [7, 2, 4]])
    max_sim = np.array([0.1, 0.5, 0.95, 0.3, 0.75, 0.9, 0.2, 0.7])
    assert rankwise_fill(values, indices, max_sim, 3).tolist() == [2, 5, 4]
    assert rankwise_fill(values, indices, max_sim, 4).tolist() == [2, 5, 4, 7]
    # guard: only 4 unique candidates; the rest by max similarity among the others: 1 (0.5), 3 (0.3)
    assert rankwise_fill(values, indices, max_sim, 6).tolist() == [2, 5, 4, 7, 1, 3]
    with pytest.raises(ActivelabError):
        rankwise_fill(values, indices, max_sim, 9)


def test_fk_select_equals_naive_pipeline():
    rng = np.random.default_rng(3)
    pool = rng.normal(size=(200, 8)).astype(np.float32)
    miss = rng.normal(size=(30, 8)).astype(np.float32)
    out = fk_select(pool, miss, 10, np.random.default_rng(5), top_k=4, chunk_size=33)
    first = int(np.random.default_rng(5).integers(30))
    centres = naive_kcenter(miss, 10, first)
    sims = pool @ miss[centres].T  # dense reference, fine at this size
    order = np.argsort(-sims, axis=0, kind="stable")[:4]
    chosen = []
    for r in range(4):
        for m in np.argsort(-sims[order[r], range(len(centres))], kind="stable"):
            if order[r, m] not in chosen and len(chosen) < 10:
                chosen.append(int(order[r, m]))
    assert out.tolist() == chosen
    # fewer misclassified than the budget: every one is a centre (no k-center)
    out2 = fk_select(pool, miss[:3], 5, np.random.default_rng(0), top_k=2)
    assert len(set(out2.tolist())) == 5


# -- estimators and the strategy ---------------------------------------------------------------------------


def test_p_hat_labels_equal_brute_force_nearest_neighbour():
    torch.manual_seed(0)
    model, pool, val = TinyNet(), make_pool(50), make_pool(24, seed=1)
    vd = compute_descriptors(model, val, np.arange(24), TAPS, {"argmax": "argmax"})
    for use_g in (None, "argmax"):
        ref = similarity_vectors(vd.z, vd.segments, vd.g["argmax"] if use_g else None)
        fn = nearest_label_fn(ref, val.targets, vd.segments, use_g, chunk_size=5)
        labels = {"argmax": "argmax", "est": fn}
        pd = compute_descriptors(model, pool, np.arange(50), TAPS, labels, batch_size=16)

        # brute force: Pearson-based similarity sum over segments, dense
        def r(a, b):
            return sum(
                (hi - lo - 1) * np.corrcoef(a[lo:hi], b[lo:hi])[0, 1]
                for lo, hi in zip(vd.segments[:-1], vd.segments[1:], strict=True)
            )

        sims = np.array(
            [
                [r(pd.z[i], vd.z[j]) + (r(pd.g["argmax"][i], vd.g["argmax"][j]) if use_g else 0.0) for j in range(24)]
                for i in range(50)
            ]
        )
        np.testing.assert_array_equal(pd.labels["est"], val.targets[sims.argmax(1)])


def _run(name_params, model, pool, val, labeled, budget, seed=0, info=None):
    strategy = get_strategy("fk")(**name_params)
    return run_strategy(strategy, model, pool, labeled, budget, np.random.default_rng(seed), val, 16, info=info)


@pytest.mark.parametrize(
    "params",
    [
        {"similarity": "features"},
        {"estimator": "argmax"},
        {"estimator": "p_hat"},
        {"estimator": "p_hat_zg"},
        {"estimator": "oracle"},
        {"estimator": "trace_cov", "perturbations": 2},
        {"estimator": "mutual_info", "perturbations": 3},
    ],
)
def test_every_estimator_selects_and_records(params):
    torch.manual_seed(0)
    info: dict = {}
    out = _run(params, TinyNet(), make_pool(40), make_pool(24, seed=1), np.arange(0, 40, 4), 6, info=info)
    assert len(set(out.tolist())) == 6 and not set(out.tolist()) & set(range(0, 40, 4))
    assert info["misclassified_validation"] > 0
    if params.get("similarity") != "features":
        assert sum(info["pseudo_label_counts"]) == 30


def test_only_oracle_reads_pool_labels():
    assert get_strategy("fk")(estimator="oracle").reads_pool_labels
    for est in ("argmax", "p_hat", "p_hat_zg", "trace_cov", "mutual_info"):
        assert not get_strategy("fk")(estimator=est).reads_pool_labels
    assert not get_strategy("fk")(similarity="features").reads_pool_labels
    with pytest.raises(ActivelabError, match="no Fisher scores"):
        get_strategy("fk")(similarity="features", estimator="oracle")


def test_oracle_depends_on_pool_labels():
    torch.manual_seed(0)
    model, pool, val = TinyNet(), make_pool(60), make_pool(24, seed=1)
    relabelled = pool.with_labels((pool.targets + 1) % 4)
    differs = []
    for seed in range(3):
        a = activelab.select("fk", copy.deepcopy(model), pool, budget=8, validation=val, seed=seed, estimator="oracle")
        b = activelab.select(
            "fk", copy.deepcopy(model), relabelled, budget=8, validation=val, seed=seed, estimator="oracle"
        )
        differs.append(set(a.tolist()) != set(b.tolist()))
    assert any(differs)


def test_random_fallback_when_no_validation_sample_is_misclassified():
    torch.manual_seed(0)
    model, pool, val = TinyNet(), make_pool(40), make_pool(24, seed=1)
    d = compute_descriptors(model, val, np.arange(24), TAPS)
    agreeing = val.with_labels(d.predictions)  # the model is right on every validation sample
    info: dict = {}
    out = _run({"estimator": "p_hat"}, model, pool, agreeing, np.array([], dtype=np.int64), 5, seed=2, info=info)
    assert info["fallback"] == "random"
    expected = np.random.default_rng(2).choice(40, size=5, replace=False)
    np.testing.assert_array_equal(out, expected)


def test_needs_validation_and_flags():
    assert FisherKernel.needs_validation and not FisherKernel.first_round_random
    with pytest.raises(ActivelabError, match="validation"):
        activelab.select("fk", TinyNet(), make_pool(20), budget=2)
