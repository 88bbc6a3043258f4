"""DIRECT (Nuggehalli, Zhang, Jain & Nowak, 2023; ICML 2025): optimal-separation active learning under imbalance.

Same per-class margin orders as GALAXY (:func:`~activelab.strategies.galaxy.margin_orders`). Along path k the
weights are w = +1 (labeled k), -1 (labeled other), 0 (unlabeled), and a threshold t (nodes before t called k)
scores acc(t) = sum_{i<t} w_i - sum_{i>=t} w_i = 2 W_t - W_n from one cumulative sum W.

1. Version-space reduction, about half the budget: if budget // C // 2 < min_budget_per_class every class gets
   B2 = budget // C // 2, otherwise only the budget // (2 min_budget_per_class) rarest labeled classes get
   B2 = min_budget_per_class. Per such class, the uncertainty interval [I, J] runs from the end of the leading run
   of labeled-k nodes to the start of the trailing run of labeled-other nodes; until B2 is spent, draw
   min(B1, B2) unlabeled nodes uniformly in [I, J], label them (one oracle sub-batch), and move whichever end of
   the interval has the lower threshold score until its unlabeled count shrinks by diam^(1 / (B2 // B1)).
2. The rest of the budget, split evenly over all classes in random order: t* = argmax acc(t) and the unlabeled
   nodes nearest t*, alternating left and right (one sub-batch per class, in chunks of B1).

The shrinking walk compares the scores at the two ends one step at a time in LabelBench (O(N) per step,
O(N^2) per shrink). Here it is one vectorised merge: from each end the scores split into blocks that start
at a running maximum; the walk removes whole blocks in increasing order of their first score, so one sort of
the blocks gives the order of removals, and a cumulative count of the unlabeled nodes removed gives where it
stops. Ties between the two ends: LabelBench flips a coin at each tie; here the blocks of equal score from the
two ends are interleaved uniformly at random (also a random tie rule; the walks differ in distribution only).

Time O(C N log N) for the sorts plus O(N) per sub-batch; memory O(C N).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from .base import Strategy, StrategyParams, register
from .galaxy import Oracle, _check, context_nodes, margin_orders, require_oracle

Tie = Literal["random", "left", "right"]


def threshold_scores(w: np.ndarray) -> np.ndarray:
    """acc(t) for t = 0..n: sum_{i<t} w_i - sum_{i>=t} w_i."""
    cum = np.concatenate(([0], np.cumsum(w)))
    return 2 * cum - cum[-1]


def _blocks(seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and first values of the blocks of ``seq`` that begin at a (non-strict) running maximum."""
    starts = np.flatnonzero(seq == np.maximum.accumulate(seq))
    return starts, seq[starts]


def shrink_interval(
    acc: np.ndarray, unlabeled: np.ndarray, lo: int, hi: int, need: int, rng: np.random.Generator, tie: Tie = "random"
) -> tuple[int, int]:
    """The walk that moves the lower-scoring end of [lo, hi] inwards until ``need`` unlabeled nodes have left the
    interval; returns the new (lo, hi). ``need`` must be below the unlabeled count in [lo, hi]."""
    if need <= 0:
        return lo, hi
    seq = acc[lo : hi + 1]
    unl = unlabeled[lo : hi + 1].astype(np.int64)
    sides = []
    for s, u in ((seq, unl), (seq[::-1], unl[::-1])):
        starts, heads = _blocks(s)
        ends = np.append(starts[1:], len(s))
        cu = np.concatenate(([0], np.cumsum(u)))
        sides.append((starts, ends, heads, cu[ends] - cu[starts], cu))
    (sl, el, hl, ul, cul), (sr, er, hr, ur, cur) = sides
    value = np.concatenate((hl, hr))
    side = np.concatenate((np.zeros(len(hl), np.int64), np.ones(len(hr), np.int64)))
    if tie == "random":
        key = rng.random(len(side))
    elif tie in ("left", "right"):
        key = side if tie == "left" else 1 - side
    else:
        raise ActivelabError(f"tie must be 'random', 'left' or 'right'; got {tie!r}")
    slot_side = side[np.lexsort((key, value))]
    # the k-th slot of a side takes that side's k-th block (its heads are non-decreasing)
    rank = np.cumsum(slot_side == 0) - 1, np.cumsum(slot_side == 1) - 1
    blk = np.where(slot_side == 0, rank[0], rank[1])
    slot_unl = np.where(slot_side == 0, ul[np.minimum(blk, len(ul) - 1)], ur[np.minimum(blk, len(ur) - 1)])
    removed = np.cumsum(slot_unl)
    s = int(np.searchsorted(removed, need))  # first slot whose removal reaches ``need``
    before = removed[s - 1] if s else 0
    left_blocks = int((slot_side[:s] == 0).sum())
    right_blocks = int((slot_side[:s] == 1).sum())
    nl = int(el[left_blocks - 1]) if left_blocks else 0
    nr = int(er[right_blocks - 1]) if right_blocks else 0
    starts, cu = (sl, cul) if slot_side[s] == 0 else (sr, cur)
    # inside the last block: stop right after its (need - before)-th unlabeled node
    m = int(np.searchsorted(cu, cu[starts[blk[s]]] + need - before))
    if slot_side[s] == 0:
        nl = m
    else:
        nr = m
    return lo + nl, hi - nr


def _weights(path_labels: np.ndarray, k: int) -> np.ndarray:
    return np.where(path_labels < 0, 0, np.where(path_labels == k, 1, -1))


def _interval(w: np.ndarray) -> tuple[int, int]:
    """[I, J]: end of the leading run of labeled-k, start of the trailing run of labeled-other (LabelBench's)."""
    n = len(w)
    pos = np.flatnonzero(w != 0)
    flag = w[pos] > 0
    lo = 0
    first_other = np.flatnonzero(~flag)
    lead = first_other[0] if len(first_other) else len(flag)
    if lead > 0:
        lo = int(pos[lead - 1])
    hi = n - 1
    ks = np.flatnonzero(flag)
    trail = ks[-1] + 1 if len(ks) else 0
    if trail < len(flag):
        hi = int(pos[trail])
    return lo, hi


def direct_select(
    probs: np.ndarray,
    labeled: np.ndarray,
    labels: np.ndarray,
    budget: int,
    ask: Oracle,
    rng: np.random.Generator,
    b1: int = 20,
    min_budget_per_class: int = 60,
    tie: Tie = "random",
) -> np.ndarray:
    """DIRECT's picks as node indices, in pick order. Arguments as :func:`~activelab.strategies.galaxy.galaxy_select`;
    ``ask`` is called with sub-batches of at most ``b1`` nodes, and every asked node is a pick."""
    labeled = np.asarray(labeled, dtype=bool).copy()
    labels = np.where(labeled, np.asarray(labels, dtype=np.int64), -1)
    _check(labels, labeled, budget)
    if b1 < 1 or min_budget_per_class < 1:
        raise ActivelabError("b1 and min_budget_per_class must be at least 1")
    n_class = probs.shape[1]
    orders = margin_orders(probs, one_path_for_two=False)
    picks: list[int] = []

    def label(nodes: np.ndarray) -> None:
        for i in range(0, len(nodes), b1):
            chunk = nodes[i : i + b1]
            labels[chunk] = np.asarray(ask(chunk), dtype=np.int64).reshape(-1)
            labeled[chunk] = True
            picks.extend(chunk.tolist())

    counts = np.bincount(labels[labeled], minlength=n_class)
    rarest_last = np.argsort(-counts, kind="stable")
    if budget // n_class // 2 < min_budget_per_class:
        eff, b2_all = n_class, budget // n_class // 2
    else:
        eff, b2_all = budget // (2 * min_budget_per_class), min_budget_per_class
    for k in rarest_last[len(rarest_last) - eff :] if eff else []:
        order = orders[k]
        w = _weights(labels[order], k)
        lo, hi = _interval(w)
        b2 = min(b2_all, int((~labeled).sum()))
        while b2 > 0:
            take = min(b1, b2)
            unl = ~labeled[order]
            inside = lo + np.flatnonzero(unl[lo : hi + 1])
            if not len(inside):
                break
            chosen = rng.choice(inside, size=min(take, len(inside)), replace=False)
            label(order[chosen])
            w[chosen] = np.where(labels[order[chosen]] == k, 1, -1)
            unl[chosen] = False
            diam = int(unl[lo : hi + 1].sum())
            if diam > 0:
                base = b2 // b1
                c2 = 1.0 if base <= 1 else diam ** (1.0 / base)
                lo, hi = shrink_interval(threshold_scores(w), unl, lo, hi, diam - math.ceil(diam / c2), rng, tie)
            b2 -= take
    rem = budget - len(picks)
    for i, k in enumerate(rng.permutation(n_class)):
        share = rem * (i + 1) // n_class - rem * i // n_class
        if share <= 0:
            continue
        order = orders[k]
        t = int(np.argmax(threshold_scores(_weights(labels[order], k))))
        free = np.flatnonzero(~labeled[order])
        left = free < t
        dist = np.where(left, t - 1 - free, free - t)
        near = free[np.lexsort((~left, dist))][:share]  # at equal distance the left node first
        label(order[near])
    return np.asarray(picks, dtype=np.int64)


@register
class Direct(Strategy):
    """DIRECT (Nuggehalli, Zhang, Jain & Nowak; arXiv 2312.09196, ICML 2025; port in LabelBench).

    One-dimensional version-space reduction per rare class along the margin paths, then labels around each
    class's best threshold (see the module docstring). The oracle is asked in sub-batches of ``b1`` (the parallel
    annotators). Time O(C N log N + (budget / b1) N), memory O(C N). Deviations from LabelBench: the shrinking
    walk is a vectorised block merge (same walk; ties between the two ends interleaved uniformly at random
    instead of a coin per tie); rarest classes ranked by a stable sort. Refuses to run without an oracle.
    """

    name = "direct"
    uses_oracle = True
    first_round_random = True
    outputs = ("probs",)

    class Params(StrategyParams):
        b1: int = Field(20, ge=1, description="sub-batch size (parallel annotators)")
        min_budget_per_class: int = Field(60, ge=1)

    def query(self, ctx, budget, rng):
        require_oracle(ctx, self.name)
        probs, labeled, labels = context_nodes(ctx)
        p = self.params
        return direct_select(probs, labeled, labels, budget, ctx.ask, rng, p.b1, p.min_budget_per_class)
