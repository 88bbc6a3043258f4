"""BADGE (Ash et al., ICLR 2020): k-means++ seeding on gradient embeddings, without materialising them.

The gradient embedding of x is g(x) = a(x) (x) h(x): a = onehot(yhat) - p (the gradient of the cross-entropy
at the predicted label with respect to the logits, sign flipped) and h the classifier's input. It has C d
entries, so N x (C d) embeddings (50,000 x 5,120 floats = 1 GB for ResNet-18 features on CIFAR-10) are never
built. Distances factorise:
    ||a (x) h - a' (x) h'||^2 = |a|^2 |h|^2 + |a'|^2 |h'|^2 - 2 (a . a') (h . h'),
so adding a centre costs one (N x C) and one (N x d) matrix-vector product.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from .base import Strategy, StrategyParams, register

FirstCenter = Literal["max_norm", "random"]


def badge_factors(probs: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, h): a = onehot(argmax p) - p (N, C) float64 and h (N, d) as given; g(x) = a(x) (x) h(x)."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) != len(features):
        raise ActivelabError(f"probs has {len(probs)} rows but features has {len(features)}")
    a = -probs.copy()
    a[np.arange(len(a)), probs.argmax(axis=1)] += 1.0
    return a, np.asarray(features)


def _sample_d2(d2: np.ndarray, chosen: np.ndarray, rng: np.random.Generator) -> int:
    """Draw an index with probability proportional to ``d2`` (zero for chosen ones) by inverse CDF on one
    uniform; if every unchosen weight is zero (duplicates), a uniform draw among the unchosen."""
    w = np.where(chosen, 0.0, d2)
    total = w.sum()
    if not np.isfinite(total):
        raise ActivelabError("BADGE distances are not finite: the model's outputs contain NaN or inf")
    if total <= 0.0:
        return int(rng.choice(np.flatnonzero(~chosen)))
    cdf = np.cumsum(w)
    j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    j = min(j, len(w) - 1)
    while w[j] <= 0.0:  # only reachable through rounding at the very end of the cdf
        j -= 1
    return j


def _first(norms2: np.ndarray, first: FirstCenter, rng: np.random.Generator) -> int:
    if first == "max_norm":
        return int(np.argmax(norms2))
    if first == "random":
        return int(rng.integers(len(norms2)))
    raise ActivelabError(f"first_center must be 'max_norm' or 'random'; got {first!r}")


class _ClassSortedDots:
    """h_i . h_j for a subset of rows i: the rows predicted as j's class are read as one contiguous slice of a
    class-sorted copy of h (most of the rows a new centre can move share its predicted class), the others are
    gathered. Memory: one copy of h."""

    def __init__(self, h: np.ndarray, groups: np.ndarray) -> None:
        self.h = h
        self.groups = groups
        self.order = np.argsort(groups, kind="stable")
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(len(self.order))
        self.sorted_h = h[self.order]
        self.bounds = np.searchsorted(groups[self.order], np.arange(groups.max() + 2))

    def __call__(self, rows: np.ndarray, j: int) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        g = self.groups[j]
        lo, hi = self.bounds[g], self.bounds[g + 1]
        same = self.groups[rows] == g
        n_same = int(same.sum())
        if n_same and n_same * 4 >= hi - lo:
            seg = self.sorted_h[lo:hi] @ self.h[j]
            out[same] = seg[self.rank[rows[same]] - lo]
            rest = ~same
            if rest.any():
                out[rest] = self.h[rows[rest]] @ self.h[j]
        else:
            out[:] = self.h[rows] @ self.h[j]
        return out


def kmeans_pp_factorised(
    a: np.ndarray, h: np.ndarray, budget: int, rng: np.random.Generator, first: FirstCenter = "max_norm"
) -> np.ndarray:
    """k-means++ seeding of the embeddings a_i (x) h_i, in pick order, from the factors only.

    The first centre is the largest embedding norm (as in BADGE's code) or uniform; each next one is drawn with
    probability proportional to the squared distance to the nearest chosen centre.

    Adding centre j needs a . a_j for every i (N x C, cheap) and h . h_j (N x d, the expensive part). By
    Cauchy-Schwarz |h_i . h_j| <= |h_i| |h_j|, so the new distance is at least
    |g_i|^2 + |g_j|^2 - 2 |a_i . a_j| |h_i| |h_j|; points whose current distance is already below that bound
    (mostly those predicted in another class than j, where a_i . a_j is small or negative) cannot move and are
    skipped (a relative margin of 1e-6 keeps rounding from ever skipping a point that would move). The rest are
    read from a class-sorted copy of h, so that the dot products run over contiguous rows. The picks are exactly
    those of plain k-means++ on the materialised embeddings (:func:`kmeans_pp_dense`).

    Time O(b N (C + d)) at worst (far less once the distances are small), memory O(N (C + d)).
    """
    n = len(a)
    if not 1 <= budget <= n:
        raise ActivelabError(f"budget must lie in [1, {n}]; got {budget}")
    a = np.asarray(a, dtype=np.float64)
    na2 = np.einsum("ij,ij->i", a, a)
    nh2 = np.einsum("ij,ij->i", h, h, dtype=np.float64)
    nh = np.sqrt(nh2)
    norms2 = na2 * nh2
    dots = _ClassSortedDots(h, a.argmax(axis=1))
    chosen = np.zeros(n, dtype=bool)
    d2 = np.full(n, np.inf)
    j = _first(norms2, first, rng)
    picks = [j]
    while True:
        chosen[j] = True
        aa = a @ a[j]
        reach = norms2 + norms2[j]
        bound = reach - 2.0 * np.abs(aa) * nh * nh[j]
        live = np.flatnonzero(bound <= d2 + 1e-6 * reach)
        if len(live) > n // 2:
            dist = reach - 2.0 * aa * (h @ h[j]).astype(np.float64)
            np.minimum(d2, np.maximum(dist, 0.0), out=d2)
        elif len(live):
            dist = reach[live] - 2.0 * aa[live] * dots(live, j)
            d2[live] = np.minimum(d2[live], np.maximum(dist, 0.0))
        d2[j] = 0.0
        if len(picks) == budget:
            return np.asarray(picks, dtype=np.int64)
        j = _sample_d2(d2, chosen, rng)
        picks.append(j)


def kmeans_pp_dense(
    x: np.ndarray, budget: int, rng: np.random.Generator, first: FirstCenter = "max_norm"
) -> np.ndarray:
    """The same k-means++ on materialised embeddings x (N, D): the reference for tests and benchmarks.
    Memory O(N D)."""
    n = len(x)
    norms2 = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    chosen = np.zeros(n, dtype=bool)
    d2 = np.full(n, np.inf)
    j = _first(norms2, first, rng)
    picks = [j]
    while True:
        chosen[j] = True
        dist = norms2 + norms2[j] - 2.0 * (x @ x[j]).astype(np.float64)
        np.minimum(d2, np.maximum(dist, 0.0), out=d2)
        d2[j] = 0.0
        if len(picks) == budget:
            return np.asarray(picks, dtype=np.int64)
        j = _sample_d2(d2, chosen, rng)
        picks.append(j)


def materialise(a: np.ndarray, h: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The N x (C d) gradient embeddings a_i (x) h_i (only for references: this is what BADGE avoids)."""
    a, h = np.asarray(a, dtype=dtype), np.asarray(h, dtype=dtype)
    return (a[:, :, None] * h[:, None, :]).reshape(len(a), -1)


@register
class Badge(Strategy):
    """BADGE: Batch Active learning by Diverse Gradient Embeddings (Ash, Zhang, Krishnamurthy, Langford,
    Agarwal, ICLR 2020).

    Gradient embeddings (onehot(yhat) - p) (x) h of the unlabeled pool from one forward pass; k-means++ seeding
    picks the batch (:func:`kmeans_pp_factorised`: factorised distances, seeded by the ``rng``).

    Complexity: one forward pass; O(b N (C + d)) time and O(N (C + d)) memory (the N x C d embeddings are never
    formed). Deviations from the authors' code: no materialised embeddings (same distances up to rounding); the
    next centre is drawn by inverse CDF from the explicit generator (theirs: scipy's rv_discrete with global
    state, redrawing already chosen points); if every remaining distance is zero the rest are drawn uniformly
    (theirs stopped in a debugger). ``first_center="max_norm"`` follows their code (the largest gradient
    embedding); ``"random"`` is the textbook k-means++.
    """

    name = "badge"
    first_round_random = False
    outputs = ("probs", "embeddings")

    class Params(StrategyParams):
        first_center: FirstCenter = Field("max_norm", description="largest embedding norm (BADGE's code) or random")

    def query(self, ctx, budget, rng):
        a, h = badge_factors(ctx.probs("candidates"), ctx.embeddings("candidates"))
        return kmeans_pp_factorised(a, h, budget, rng, self.params.first_center)
