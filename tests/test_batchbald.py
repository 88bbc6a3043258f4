"""BatchBALD against brute-force joint entropies (all label configurations enumerated), and its memory bound."""

from __future__ import annotations

import functools
import itertools
import tracemalloc

import numpy as np
import pytest

from activelab.strategies.batchbald import _JointConfigurations, batchbald_select


def _probs(rng, passes, n, c, sharpness=2.0):
    logits = rng.normal(size=(passes, n, c)) * sharpness + rng.normal(size=(1, n, c)) * sharpness
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def brute_joint_entropy(probs, batch):
    """H(y_batch) with every configuration enumerated: p(y) = mean_w prod_i p_w(y_i | x_i)."""
    probs = probs.astype(np.float64)
    h = 0.0
    for config in itertools.product(range(probs.shape[2]), repeat=len(batch)):
        p = np.mean(np.prod([probs[:, i, y] for i, y in zip(batch, config)], axis=0))
        h -= p * np.log(p) if p > 0 else 0.0
    return h


def brute_batchbald(probs, budget):
    cond = [np.mean([-(p * np.log(p)).sum() for p in probs[:, i].astype(np.float64)]) for i in range(probs.shape[1])]
    batch = []
    for _ in range(budget):
        scores = [
            -np.inf if i in batch else brute_joint_entropy(probs, batch + [i]) - sum(cond[j] for j in batch + [i])
            for i in range(probs.shape[1])
        ]
        batch.append(int(np.argmax(scores)))
    return batch, scores


@pytest.mark.parametrize("passes,n,c,budget", [(5, 9, 3, 4), (3, 7, 2, 5)])
def test_exact_mode_matches_brute_force(passes, n, c, budget):
    probs = _probs(np.random.default_rng(n), passes, n, c)
    picks, scores = batchbald_select(probs, budget, np.random.default_rng(0), num_samples=c**budget)
    want, want_scores = brute_batchbald(probs, budget)
    np.testing.assert_array_equal(picks, want)
    assert scores[-1] == pytest.approx(max(want_scores), rel=1e-9)


def test_first_pick_is_bald_and_picks_are_diverse():
    rng = np.random.default_rng(1)
    probs = _probs(rng, 6, 20, 3)
    probs[:, 10:20] = probs[:, :10]  # every candidate has a duplicate
    picks, _ = batchbald_select(probs, 4, rng)
    p64 = probs.astype(np.float64)
    mean = p64.mean(0)
    bald = -(mean * np.log(mean)).sum(1) + (p64 * np.log(p64)).sum(2).mean(0)
    assert picks[0] == np.argmax(bald)
    top_bald = np.argsort(-bald, kind="stable")[:4]
    assert len({int(i) % 10 for i in top_bald}) == 2  # BALD takes both copies of its two best

    def joint_mi(batch):
        cond = sum(-(p64[:, i] * np.log(p64[:, i])).sum(1).mean() for i in batch)
        return brute_joint_entropy(probs, [int(i) for i in batch]) - cond

    assert len({int(i) % 10 for i in picks}) > 2
    assert joint_mi(picks) > joint_mi(top_bald) + 0.05


def dense_joint_entropy(probs, batch):
    """H(y_batch) from the full joint table of each pass (outer products), for batches too large to loop over."""
    h_table = 0.0
    for p in probs.astype(np.float64):
        table = functools.reduce(np.multiply.outer, [p[i] for i in batch])
        h_table = h_table + table / len(probs)
    return float(-(h_table * np.log(h_table)).sum())


def test_sampled_mode_is_seeded_and_close_to_exact():
    probs = _probs(np.random.default_rng(5), 4, 8, 10, sharpness=0.7)
    batch = [0, 1, 2, 3, 4]  # 10^5 configurations > M = 20000: sampled
    rows = np.arange(5, 8)
    want = np.array([dense_joint_entropy(probs, batch + [int(r)]) for r in rows])
    assert dense_joint_entropy(probs, [0, 1]) == pytest.approx(brute_joint_entropy(probs, [0, 1]))
    estimates = []
    for seed in (0, 0, 1):
        joint = _JointConfigurations(probs, num_samples=20000, rng=np.random.default_rng(seed))
        for i in batch:
            joint.add(i)
        assert not joint.exact and joint.table.shape == (4, 20000)
        estimates.append(joint.joint_entropies(rows, 2**20))
    np.testing.assert_array_equal(estimates[0], estimates[1])
    assert not np.array_equal(estimates[0], estimates[2])
    np.testing.assert_allclose(estimates[2], want, atol=0.03)
    np.testing.assert_allclose(estimates[0], want, atol=0.03)


def test_memory_stays_under_the_chunk_bound():
    passes, n, c, m = 6, 1500, 10, 2000
    probs = _probs(np.random.default_rng(0), passes, n, c)
    chunk = 2**18  # float64 entries: 2 MB
    naive_bytes = n * m * c * 8  # the (N, M, C) tensor of the naive form: 240 MB
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    picks, _ = batchbald_select(probs, 5, np.random.default_rng(0), num_samples=m, chunk_elements=chunk)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert len(set(picks.tolist())) == 5
    bound = 3 * chunk * 8 + 2 * passes * m * 8 + 64 * n  # scoring temporaries + the configurations + (N,) vectors
    assert peak < bound < naive_bytes / 25, (peak, bound)
    print(f"peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, naive {naive_bytes / 2**20:.0f} MiB")


def test_too_many_candidates_is_refused_before_any_pass_and_subset_runs():
    from activelab.errors import ActivelabError
    from activelab.strategies import get_strategy

    from .conftest import make_pool, run_strategy
    from .test_strategy_contract import CountingNet

    pool = make_pool(60)
    model = CountingNet(pool)
    strategy = get_strategy("batchbald")(mc_samples=2, num_samples=16, max_candidates=30)
    with pytest.raises(ActivelabError, match=r"N=50 candidates .*hours of one CPU core.*subset: 30"):
        run_strategy(strategy, model, pool, np.arange(10), 3, np.random.default_rng(0))
    assert model.seen.sum() == 0  # refused before the stochastic passes
    from activelab.strategies.wrappers import build_strategy

    params = {"mc_samples": 2, "num_samples": 16, "max_candidates": 30}
    wrapped = build_strategy("batchbald", params, ["class_balanced"])
    with pytest.raises(ActivelabError, match=r"N=50 candidates"):  # before class_balanced's own forward pass
        run_strategy(wrapped, model, pool, np.arange(10), 3, np.random.default_rng(0))
    assert model.seen.sum() == 0
    strategy = get_strategy("batchbald")(mc_samples=2, num_samples=16, max_candidates=30, subset=30)
    picks = run_strategy(strategy, model, pool, np.arange(10), 3, np.random.default_rng(0))
    assert len(set(picks.tolist())) == 3 and model.seen[10:].sum() == 2 * 30  # only the subset, K passes
