"""GALAXY (Zhang, Katz-Samuels & Nowak, ICML 2022): graph-based active learning at the extreme of imbalance.

Per class k, the nodes (labeled and candidate samples together) are sorted by the margin score
m_ik = p_ik - max_j p_ij (+ 1e-8 max_j p_ij to order the predicted-k nodes by confidence, as LabelBench does):
C one-vs-rest "linear graphs" (paths) whose node label is +1 if y = k, else -1. Each of the ``budget`` queries
takes one class k (the authors: round robin; LabelBench: uniform at random), finds the shortest run of unlabeled
nodes between two consecutive labeled nodes of opposite label along path k and queries its midpoint (the
bisection of the S^2 graph algorithm). The queried label is used at once: GALAXY asks the in-round oracle for it
before the next query. With two classes the two paths mirror each other and one path (sorted by p_0) is used.

If no such run exists on path k, the fallback is LabelBench's: the unlabeled node nearest to an adjacent
labeled pair (non-k, k) in inverted order, else a uniformly random unlabeled node.

Vectorised and incremental: per path we keep only the sorted path positions of the labeled nodes and their
+/- flags; the gaps between neighbours are differences of that array, so a query costs O(C L) numpy work
(L labeled nodes) instead of the authors' O(N) Python scan; a round costs one O(C N log N) sort.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from .base import Strategy, StrategyParams, register

ClassChoice = Literal["round_robin", "random"]
Oracle = Callable[[np.ndarray], np.ndarray]


def margin_orders(probs: np.ndarray, one_path_for_two: bool = True) -> np.ndarray:
    """(G, M) node orders: path k lists the nodes by decreasing margin score of class k (stable sort).

    G = C, or 1 for C = 2 when ``one_path_for_two`` (then path 0 sorts by p_0)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ActivelabError(f"probs must be (N, C) with C >= 2; got shape {probs.shape}")
    top = probs.max(axis=1, keepdims=True)
    if probs.shape[1] == 2 and one_path_for_two:
        scores = probs[:, :1]
    else:
        scores = probs - top + 1e-8 * top
    return np.argsort(-scores, axis=0, kind="stable").T.copy()


def _check(labels: np.ndarray, labeled: np.ndarray, budget: int) -> None:
    if labels.shape != labeled.shape:
        raise ActivelabError("labels and labeled mask must have one entry per node")
    free = int((~labeled).sum())
    if not 0 <= budget <= free:
        raise ActivelabError(f"budget {budget} is larger than the {free} unlabeled nodes")


class _Path:
    """One path: sorted positions of its labeled nodes and their flags (y == k)."""

    def __init__(self, order: np.ndarray, labeled: np.ndarray, labels: np.ndarray, k: int) -> None:
        self.order = order
        self.rank = np.empty_like(order)
        self.rank[order] = np.arange(len(order))
        self.k = k
        self.pos = np.sort(self.rank[np.flatnonzero(labeled)])
        self.flag = labels[order[self.pos]] == k

    def add(self, node: int, label: int) -> None:
        r = self.rank[node]
        i = int(np.searchsorted(self.pos, r))
        self.pos = np.insert(self.pos, i, r)
        self.flag = np.insert(self.flag, i, label == self.k)

    def bisection(self) -> int | None:
        """Path position of the midpoint of the shortest unlabeled run between opposite labels (first one on
        ties), or None."""
        if len(self.pos) < 2:
            return None
        gaps = np.diff(self.pos) - 1
        valid = (self.flag[1:] != self.flag[:-1]) & (gaps > 0)
        if not valid.any():
            return None
        i = int(np.argmin(np.where(valid, gaps, np.iinfo(np.int64).max)))
        return int((self.pos[i] + self.pos[i + 1]) // 2)

    def nearest_to_inversion(self, n: int) -> int | None:
        """LabelBench's fallback: adjacent labeled pairs (non-k at t, k at t + 1); the nearest unlabeled node to
        the left of the pair's labeled run or to its right (left wins ties; among equals the rightmost pair)."""
        pos, flag = self.pos, self.flag
        if len(pos) < 2:
            return None
        pair = np.flatnonzero((np.diff(pos) == 1) & ~flag[:-1] & flag[1:])
        if not len(pair):
            return None
        brk = np.flatnonzero(np.diff(pos) != 1)  # run boundaries among labeled positions
        starts = np.concatenate(([0], brk + 1))
        ends = np.concatenate((brk, [len(pos) - 1]))
        run_of = np.cumsum(np.concatenate(([0], (np.diff(pos) != 1).astype(np.int64))))
        left_node = pos[starts[run_of[pair]]] - 1  # unlabeled node left of the run holding pos[pair]
        right_node = pos[ends[run_of[pair + 1]]] + 1
        big = n + 1
        dl = np.where(left_node >= 0, pos[pair] - left_node, big)
        dr = np.where(right_node < n, right_node - pos[pair + 1], big)
        best_l, best_r = dl.min(), dr.min()
        if min(best_l, best_r) >= big:
            return None
        if best_r < best_l:
            return int(right_node[np.flatnonzero(dr == best_r)[-1]])
        return int(left_node[np.flatnonzero(dl == best_l)[-1]])


def galaxy_select(
    probs: np.ndarray,
    labeled: np.ndarray,
    labels: np.ndarray,
    budget: int,
    ask: Oracle,
    rng: np.random.Generator,
    class_choice: ClassChoice = "round_robin",
) -> np.ndarray:
    """GALAXY's ``budget`` sequential queries, in pick order, as node indices.

    ``probs`` (M, C) over all nodes (labeled ones included), ``labeled`` (M,) bool, ``labels`` (M,) int with the
    known labels of labeled nodes (others ignored). ``ask(nodes)`` returns the labels of those nodes; it is called
    once per query with one node (every asked node is a pick).
    """
    labeled = np.asarray(labeled, dtype=bool).copy()
    labels = np.asarray(labels, dtype=np.int64).copy()
    _check(labels, labeled, budget)
    if class_choice not in ("round_robin", "random"):
        raise ActivelabError(f"class_choice must be 'round_robin' or 'random'; got {class_choice!r}")
    orders = margin_orders(probs)
    n = orders.shape[1]
    paths = [_Path(orders[k], labeled, labels, k) for k in range(len(orders))]
    picks: list[int] = []
    for t in range(budget):
        k = t % len(paths) if class_choice == "round_robin" else int(rng.integers(len(paths)))
        path = paths[k]
        at = path.bisection()
        if at is None:
            at = path.nearest_to_inversion(n)
        node = int(path.order[at]) if at is not None else int(rng.choice(np.flatnonzero(~labeled)))
        y = int(np.asarray(ask(np.array([node], dtype=np.int64))).reshape(-1)[0])
        labeled[node] = True
        labels[node] = y
        for p in paths:
            p.add(node, y)
        picks.append(node)
    return np.asarray(picks, dtype=np.int64)


def context_nodes(ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs, labeled mask, labels) over candidates then labeled samples: the nodes of GALAXY's and DIRECT's
    paths. Nodes 0..len(candidates)-1 are candidate positions."""
    pc = ctx.probs("candidates")
    n_lab = len(ctx.labeled)
    pl = ctx.probs("labeled") if n_lab else np.zeros((0, pc.shape[1]))
    labels = np.concatenate([np.full(len(pc), -1, np.int64), np.asarray(ctx.labeled_labels(), np.int64)])
    mask = np.concatenate([np.zeros(len(pc), bool), np.ones(n_lab, bool)])
    return np.concatenate([pc, pl]), mask, labels


def require_oracle(ctx, name: str) -> None:
    if not ctx.has_oracle:
        raise ActivelabError(
            f"{name} labels its own picks during the selection (in-round oracle): pass oracle=callable(indices) -> "
            "labels to activelab.select (experiments answer from the pool's labels)"
        )


@register
class Galaxy(Strategy):
    """GALAXY (Zhang, Katz-Samuels & Nowak, ICML 2022; authors' code jifanz/GALAXY, port in LabelBench).

    Sequential bisection along C one-vs-rest margin paths, one in-round oracle call per query (see the module
    docstring). Time: one O(C N log N) sort per round plus O(C L) per query (L labeled nodes); memory O(C N).
    Deviations: without an opposite-label run on the chosen path both class choices use LabelBench's fallback
    (nearest unlabeled node to an inverted labeled pair, else random) instead of the authors' widening of the
    graph; training (inverse-frequency class weights, retraining from scratch) is the experiment's choice
    (``train.class_weights``). Refuses to run without an oracle.
    """

    name = "galaxy"
    uses_oracle = True
    first_round_random = True
    outputs = ("probs",)

    class Params(StrategyParams):
        class_choice: ClassChoice = Field("round_robin", description="authors: round_robin; LabelBench: random")

    def query(self, ctx, budget, rng):
        require_oracle(ctx, self.name)
        probs, labeled, labels = context_nodes(ctx)
        picks = galaxy_select(probs, labeled, labels, budget, ctx.ask, rng, self.params.class_choice)
        return picks
