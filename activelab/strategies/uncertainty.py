"""Uncertainty sampling from one deterministic forward pass: least confidence, margin, entropy.

Scores are pure functions of the (N, C) softmax matrix; higher means more informative.
"""

from __future__ import annotations

import numpy as np

from .base import ScoreStrategy, register


def least_confidence_scores(probs: np.ndarray) -> np.ndarray:
    """1 - max_c p(c|x)."""
    return 1.0 - probs.max(axis=1)


def margin_scores(probs: np.ndarray) -> np.ndarray:
    """-(p_(1) - p_(2)): the smallest gap between the two most likely classes scores highest."""
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    return -(top2[:, 1] - top2[:, 0])


def entropy_scores(probs: np.ndarray) -> np.ndarray:
    """-sum_c p log p, with 0 log 0 = 0."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(p)).sum(axis=1)


class _ProbabilityStrategy(ScoreStrategy):
    """Top-``budget`` of a score of the candidates' softmax outputs.

    Complexity: one forward pass over the unlabeled pool, O(N·C) memory, O(N log N) ranking.
    """

    first_round_random = True

    @staticmethod
    def score(probs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scores(self, ctx, rng):
        return self.score(ctx.probs("candidates"))


@register
class LeastConfidence(_ProbabilityStrategy):
    """Least confidence (Lewis & Gale 1994; Settles 2009): 1 - max p. Baseline of FisherMask."""

    name = "least_confidence"
    score = staticmethod(least_confidence_scores)


@register
class Margin(_ProbabilityStrategy):
    """Margin sampling (Scheffer et al. 2001): smallest p_(1) - p_(2) first. Baseline of FisherMask."""

    name = "margin"
    score = staticmethod(margin_scores)


@register
class Entropy(_ProbabilityStrategy):
    """Maximum entropy (Shannon entropy of the softmax). Baseline of LPLgrad and FisherMask."""

    name = "entropy"
    score = staticmethod(entropy_scores)
