"""DIRECT's core against a node-by-node loop written from the description, and a hand-worked threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from activelab.strategies.direct import direct_select, shrink_interval, threshold_scores

from .conftest import noisy_margin_problem


def _walk(acc, unlabeled, lo, hi, need, tie):
    """One step at a time: move the end whose threshold score is lower; ties by a fixed side."""
    removed = 0
    while removed < need:
        if acc[lo] < acc[hi] or (acc[lo] == acc[hi] and tie == "left"):
            removed += bool(unlabeled[lo])
            lo += 1
        else:
            removed += bool(unlabeled[hi])
            hi -= 1
    return lo, hi


@pytest.mark.parametrize("tie", ["left", "right"])
@pytest.mark.parametrize("seed", range(6))
def test_vectorised_walk_equals_the_step_loop(tie, seed):
    rng = np.random.default_rng(seed)
    n = 80
    w = rng.choice([-1, 0, 0, 1], size=n)
    acc = threshold_scores(w)
    unl = w == 0
    lo, hi = 3, n - 2
    total = int(unl[lo : hi + 1].sum())
    for need in range(0, total):
        assert shrink_interval(acc, unl, lo, hi, need, rng, tie) == _walk(acc, unl, lo, hi, need, tie)


def test_threshold_scores_by_the_definition():
    w = np.array([1, 0, -1, 1, 0, -1, -1])
    want = [sum(w[:t]) - sum(w[t:]) for t in range(len(w) + 1)]
    np.testing.assert_array_equal(threshold_scores(w), want)


def test_shrinks_to_the_known_range():
    # labels +1 at 0, 10, 20; -1 at 40, 50, 99: acc is 6 exactly on thresholds 21..40, lower elsewhere
    w = np.zeros(100, np.int64)
    w[[0, 10, 20]] = 1
    w[[40, 50, 99]] = -1
    acc, unl = threshold_scores(w), w == 0
    assert set(np.flatnonzero(acc == acc.max())) == set(range(21, 41))
    need = int(unl.sum()) - 19  # keep only the 19 unlabeled nodes 21..39
    assert shrink_interval(acc, unl, 0, 99, need, np.random.default_rng(0), "left") == (21, 40)
    for seed in range(5):
        lo, hi = shrink_interval(acc, unl, 0, 99, need, np.random.default_rng(seed), "random")
        assert set(lo + np.flatnonzero(unl[lo : hi + 1])) == set(range(21, 40))


def _reference(probs, labeled, labels, budget, truth, rng, b1=20, mbc=60):
    """LabelBench's procedure node by node (ties between the ends: left)."""
    n, c = probs.shape
    labeled, labels = labeled.copy(), np.where(labeled, labels, -1)
    top = probs.max(1)
    paths = [sorted(range(n), key=lambda i: (-(probs[i, k] - top[i] + 1e-8 * top[i]), i)) for k in range(c)]
    picks = []

    def wvec(k):
        return np.array([0 if not labeled[v] else (1 if labels[v] == k else -1) for v in paths[k]])

    def acc_of(w):
        return np.array([w[:t].sum() - w[t:].sum() for t in range(n + 1)])

    counts = np.bincount(labels[labeled], minlength=c)
    rank = np.argsort(-counts, kind="stable")
    if budget // c // 2 < mbc:
        eff, b2_all = c, budget // c // 2
    else:
        eff, b2_all = budget // (2 * mbc), mbc
    for k in rank[c - eff :] if eff else []:
        path = paths[k]
        w = wvec(k)
        lo = 0
        for i, v in enumerate(path):
            if labeled[v]:
                if labels[v] != k:
                    break
                lo = i
        hi = n - 1
        for i in range(n - 1, -1, -1):
            v = path[i]
            if labeled[v]:
                if labels[v] == k:
                    break
                hi = i
        b2 = min(b2_all, int((~labeled).sum()))
        while b2 > 0:
            take = min(b1, b2)
            inside = np.array([i for i in range(lo, hi + 1) if not labeled[path[i]]], dtype=np.int64)
            if not len(inside):
                break
            chosen = rng.choice(inside, size=min(take, len(inside)), replace=False)
            for i in chosen:
                v = path[i]
                labeled[v], labels[v] = True, truth[v]
                w[i] = 1 if truth[v] == k else -1
                picks.append(v)
            diam = sum(not labeled[path[i]] for i in range(lo, hi + 1))
            if diam > 0:
                base = b2 // b1
                c2 = 1 if base <= 1 else diam ** (1 / base)
                target = math.ceil(diam / c2)
                acc = acc_of(w)
                while diam > target:
                    if acc[lo] <= acc[hi]:
                        diam -= not labeled[path[lo]]
                        lo += 1
                    else:
                        diam -= not labeled[path[hi]]
                        hi -= 1
            b2 -= take
    rem = budget - len(picks)
    for i, k in enumerate(rng.permutation(c)):
        share = rem * (i + 1) // c - rem * i // c
        path = paths[k]
        t = int(np.argmax(acc_of(wvec(k))))
        left, right, side = t - 1, t, 1
        lex = rex = False
        while share > 0 and not (lex and rex):
            side = 1 - side
            if side == 0:
                if left < 0:
                    lex = True
                    continue
                if not labeled[path[left]]:
                    v = path[left]
                    labeled[v], labels[v] = True, truth[v]
                    picks.append(v)
                    share -= 1
                left -= 1
            else:
                if right >= n:
                    rex = True
                    continue
                if not labeled[path[right]]:
                    v = path[right]
                    labeled[v], labels[v] = True, truth[v]
                    picks.append(v)
                    share -= 1
                right += 1
    return np.array(picks)


def _problem(seed, n=150, c=4, n_labeled=20):
    return noisy_margin_problem(seed, n, c, n_labeled)


@pytest.mark.parametrize(
    "seed,c,n_labeled,budget,b1,mbc",
    [(0, 4, 20, 40, 20, 60), (1, 3, 5, 60, 4, 60), (2, 2, 10, 50, 3, 8), (3, 5, 0, 30, 2, 60), (4, 4, 30, 64, 5, 4)],
)
def test_same_picks_as_the_node_loop(seed, c, n_labeled, budget, b1, mbc):
    probs, labeled, labels, truth = _problem(seed, c=c, n_labeled=n_labeled)
    got = direct_select(probs, labeled, labels, budget, lambda q: truth[q], np.random.default_rng(5), b1, mbc, "left")
    want = _reference(probs, labeled, labels, budget, truth, np.random.default_rng(5), b1, mbc)
    assert len(got) == budget
    np.testing.assert_array_equal(got, want)


def test_oracle_accounting_and_unasked_labels_are_never_read():
    probs, labeled, labels, truth = _problem(6)
    calls = []

    def ask(q):
        calls.append(q.copy())
        return truth[q]

    picks = direct_select(probs, labeled, labels, 48, ask, np.random.default_rng(1), b1=5, min_budget_per_class=60)
    asked = np.concatenate(calls)
    assert max(len(q) for q in calls) <= 5
    np.testing.assert_array_equal(np.sort(asked), np.sort(picks))
    assert len(set(picks.tolist())) == 48
    other = truth.copy()
    unasked = np.setdiff1d(np.flatnonzero(~labeled), picks)
    other[unasked] = np.random.default_rng(2).permutation(other[unasked])
    again = direct_select(probs, labeled, labels, 48, lambda q: other[q], np.random.default_rng(1), b1=5)
    np.testing.assert_array_equal(picks, again)
