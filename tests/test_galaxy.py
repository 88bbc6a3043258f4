"""GALAXY's core against a per-node loop written from the description, and hand-worked paths."""

from __future__ import annotations

import numpy as np
import pytest

from activelab.errors import ActivelabError
from activelab.strategies.galaxy import galaxy_select

from .conftest import noisy_margin_problem


def _reference(probs, labeled, labels, budget, truth, rng, class_choice):
    """Node-by-node scan of each path, as in the authors' / LabelBench's loops."""
    n, c = probs.shape
    labeled = labeled.copy()
    labels = labels.copy()
    top = probs.max(axis=1)
    if c == 2:
        paths = [sorted(range(n), key=lambda i: (-probs[i, 0], i))]
        ks = [0]
    else:
        paths = [sorted(range(n), key=lambda i: (-(probs[i, k] - top[i] + 1e-8 * top[i]), i)) for k in range(c)]
        ks = list(range(c))
    picks = []
    for t in range(budget):
        g = t % len(paths) if class_choice == "round_robin" else int(rng.integers(len(paths)))
        path, k = paths[g], ks[g]
        best = None  # (length, start, end) of the shortest opposite-label run, first on ties
        last_flag, run = None, None
        for i, node in enumerate(path):
            if labeled[node]:
                flag = labels[node] == k
                if last_flag is not None and run is not None and flag != last_flag:
                    if best is None or run[1] - run[0] < best[1] - best[0]:
                        best = run
                last_flag, run = flag, None
            else:
                run = [i, i] if run is None else [run[0], i]
        if best is not None:
            at = (best[0] + best[1]) // 2
        else:
            at, dist = None, n + 1
            last_unl = None
            for i, node in enumerate(path):  # left to right: pairs (non-k, k), nearest unlabeled on the left
                if not labeled[node]:
                    last_unl = i
                    continue
                nxt = path[i + 1] if i + 1 < n else None
                if (
                    labels[node] != k
                    and nxt is not None
                    and labeled[nxt]
                    and labels[nxt] == k
                    and last_unl is not None
                    and dist >= i - last_unl
                ):
                    dist, at = i - last_unl, last_unl
            last_unl = None
            for i in range(n - 1, -1, -1):  # right to left: nearest unlabeled on the right, strictly closer
                node = path[i]
                if not labeled[node]:
                    last_unl = i
                    continue
                prv = path[i - 1] if i > 0 else None
                if (
                    labels[node] == k
                    and prv is not None
                    and labeled[prv]
                    and labels[prv] != k
                    and last_unl is not None
                    and dist > last_unl - i
                ):
                    dist, at = last_unl - i, last_unl
        node = path[at] if at is not None else int(rng.choice(np.flatnonzero(~labeled)))
        labeled[node] = True
        labels[node] = truth[node]
        picks.append(node)
    return np.array(picks)


def _problem(seed, n=120, c=4, n_labeled=15):
    return noisy_margin_problem(seed, n, c, n_labeled)


@pytest.mark.parametrize("class_choice", ["round_robin", "random"])
@pytest.mark.parametrize("seed,c,n_labeled", [(0, 4, 15), (1, 3, 2), (2, 2, 6), (3, 5, 0), (4, 4, 40)])
def test_same_picks_as_the_per_node_loop(class_choice, seed, c, n_labeled):
    probs, labeled, labels, truth = _problem(seed, c=c, n_labeled=n_labeled)
    got = galaxy_select(probs, labeled, labels, 40, lambda q: truth[q], np.random.default_rng(7), class_choice)
    want = _reference(probs, labeled, labels, 40, truth, np.random.default_rng(7), class_choice)
    np.testing.assert_array_equal(got, want)


def _path_problem():
    # 11 nodes along one path (2 classes, sorted by p_0); true threshold after node 2
    p0 = np.linspace(0.99, 0.01, 11)
    probs = np.stack([p0, 1 - p0], 1)
    truth = np.array([0, 0, 0] + [1] * 8)
    labeled = np.zeros(11, bool)
    labeled[[0, 10]] = True
    return probs, labeled, np.where(labeled, truth, -1), truth


def test_path_queries_the_known_midpoints():
    probs, labeled, labels, truth = _path_problem()
    # run 1..9 -> midpoint 5 (label 1); run 1..4 -> 2 (label 0); run 3..4 -> 3 (label 1): boundary found
    got = galaxy_select(probs, labeled, labels, 3, lambda q: truth[q], np.random.default_rng(0))
    np.testing.assert_array_equal(got, [5, 2, 3])


def test_oracle_accounting_and_unasked_labels_are_never_read():
    probs, labeled, labels, truth = _problem(5)
    asked = []

    def ask(q):
        asked.extend(q.tolist())
        return truth[q]

    picks = galaxy_select(probs, labeled, labels, 25, ask, np.random.default_rng(1))
    assert sorted(asked) == sorted(picks.tolist()) and len(set(asked)) == 25
    other = truth.copy()
    unasked = np.setdiff1d(np.flatnonzero(~labeled), picks)
    other[unasked] = np.random.default_rng(2).permutation(other[unasked])
    again = galaxy_select(probs, labeled, labels, 25, lambda q: other[q], np.random.default_rng(1))
    np.testing.assert_array_equal(picks, again)


def test_budget_above_unlabeled_is_an_error():
    probs, labeled, labels, truth = _problem(0, n=20, n_labeled=10)
    with pytest.raises(ActivelabError, match="larger than"):
        galaxy_select(probs, labeled, labels, 11, lambda q: truth[q], np.random.default_rng(0))
