"""SIMILAR's SMI functions against a brute-force greedy on materialised embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from activelab.errors import ActivelabError
from activelab.strategies.similar import Similarity, gradient_factors, rare_classes, smi_select


def _dense_sim(x, y):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    return (xn @ yn.T + 1) / 2


def _value(function, s, a, q_idx_dummy, sq, eta=1.0, lam=1.0, ridge=1.0):
    """I_f(A; Q) from the definitions; s = (N, |Q|) pool-query, sq = (|Q|, |Q|), spool = pool-pool."""
    spool, snq = s
    a = list(a)
    if function == "flqmi":
        return snq[a].max(0).sum() + eta * snq[a].max(1).sum()
    if function == "gcmi":
        return 2 * lam * snq[a].sum()
    sa = spool[np.ix_(a, a)] + ridge * np.eye(len(a))
    cond = sa - eta**2 * snq[a] @ np.linalg.inv(sq + ridge * np.eye(len(sq))) @ snq[a].T
    return np.linalg.slogdet(sa)[1] - np.linalg.slogdet(cond)[1]


def _brute(function, spool, snq, sq, budget):
    picks = []
    for _ in range(budget):
        vals = [
            _value(function, (spool, snq), picks + [i], None, sq) if i not in picks else -np.inf
            for i in range(len(snq))
        ]
        picks.append(int(np.argmax(vals)))
    return picks


@pytest.mark.parametrize("function", ["flqmi", "gcmi", "logdetmi"])
@pytest.mark.parametrize("gradient", [True, False])
def test_same_picks_as_brute_force_greedy(function, gradient):
    rng = np.random.default_rng(0)
    n, nq, c, d = 40, 5, 4, 6
    h, hq = rng.normal(size=(n, d)), rng.normal(size=(nq, d))
    logits = rng.normal(size=(n + nq, c)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    yq = rng.integers(0, c, nq)
    if gradient:
        a, aq = gradient_factors(p[:n]), gradient_factors(p[n:], yq)
        x = np.einsum("ic,id->icd", a, h).reshape(n, -1)  # the materialised gradient embeddings
        xq = np.einsum("ic,id->icd", aq, hq).reshape(nq, -1)
        pool, query = Similarity(h, a), Similarity(hq, aq)
    else:
        x, xq = h, hq
        pool, query = Similarity(h), Similarity(hq)
    got = smi_select(function, pool, query, 8)
    want = _brute(function, _dense_sim(x, x), _dense_sim(x, xq), _dense_sim(xq, xq), 8)
    np.testing.assert_array_equal(got, want)


def test_flqmi_prefers_points_near_the_query_set():
    rng = np.random.default_rng(1)
    far = rng.normal(size=(50, 3)) + [0, 0, 0]
    near = np.array([[10.0, 10, 10]]) + 0.1 * rng.normal(size=(5, 3))
    h = np.concatenate([far, near])
    got = smi_select("flqmi", Similarity(h), Similarity(np.array([[10.0, 10, 10]])), 3)
    assert set(got.tolist()) <= set(range(50, 55))


def test_logdetmi_refuses_oversized_problems_up_front():
    from activelab.strategies.similar import logdetmi_greedy

    h = np.ones((10, 2))
    with pytest.raises(ActivelabError, match="GB"):
        logdetmi_greedy(Similarity(h), Similarity(h[:2]), 5, max_bytes=10)


def test_rare_classes():
    y = np.array([0] * 10 + [1] * 10 + [2])
    np.testing.assert_array_equal(rare_classes(y, 4), [2, 3])
    np.testing.assert_array_equal(rare_classes(y, 3, share=0.6), [0, 1, 2])
    np.testing.assert_array_equal(rare_classes(np.array([0, 1]), 2), [0, 1])
    np.testing.assert_array_equal(rare_classes(y, 4, given=[1]), [1])
    with pytest.raises(ActivelabError):
        rare_classes(y, 4, given=[7])


def test_flqmi_refuses_up_front_when_its_similarities_cannot_fit_and_gcmi_needs_no_matrix(monkeypatch):
    import activelab.memory as memory
    from activelab.errors import ActivelabError
    from activelab.strategies.similar import Similarity, gcmi_top, smi_select

    rng = np.random.default_rng(0)
    pool, query = Similarity(rng.normal(size=(300, 5))), Similarity(rng.normal(size=(7, 5)))
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 10_000)
    with pytest.raises(ActivelabError, match=r"N=300 candidates and \|Q\|=7.*subsample"):
        smi_select("flqmi", pool, query, 5)
    # gcmi sums the similarities block by block: same picks as from the whole matrix, no refusal
    np.testing.assert_array_equal(smi_select("gcmi", pool, query, 5), gcmi_top(pool.rows(query, slice(None)), 5))
