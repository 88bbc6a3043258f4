"""Sufficient statistics of stochastic predictions (MC dropout, ensembles): pure array code shared by the
passes that accumulate them (:mod:`activelab.inference.mc`) and the scores computed from them
(:mod:`activelab.strategies.mc_dropout`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MCStatistics:
    """Sufficient statistics of T = E·K stochastic predictions per sample.

    - ``counts`` (N, C): how many passes predicted each class (argmax).
    - ``prob_sum`` (N, C), ``prob_sq_sum`` (N, C): Σ_t p_t and Σ_t p_t².
    - ``entropy_sum`` (N,): Σ_t H(p_t) (natural log).
    - ``passes``: T.
    """

    counts: np.ndarray
    prob_sum: np.ndarray
    prob_sq_sum: np.ndarray
    entropy_sum: np.ndarray
    passes: int

    @classmethod
    def empty(cls, n: int, num_classes: int) -> MCStatistics:
        return cls(
            np.zeros((n, num_classes), np.int64),
            np.zeros((n, num_classes), np.float64),
            np.zeros((n, num_classes), np.float64),
            np.zeros(n, np.float64),
            0,
        )

    def add(self, positions: np.ndarray | slice, probs: np.ndarray) -> None:
        """Add passes for the samples at ``positions`` (unique): ``probs`` (T, B, C), or (B, C) for one pass.
        ``passes`` is not changed (the caller knows how many passes each sample got)."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim == 2:
            probs = probs[None]
        t, b, c = probs.shape
        flat = (np.arange(b)[None, :] * c + probs.argmax(axis=2)).reshape(-1)
        votes = np.bincount(flat, minlength=b * c).reshape(b, c)
        self.counts[positions] += votes
        self.prob_sum[positions] += probs.sum(axis=0)
        self.prob_sq_sum[positions] += (probs * probs).sum(axis=0)
        self.entropy_sum[positions] += entropy(probs).sum(axis=0)

    @classmethod
    def from_samples(cls, probs: np.ndarray) -> MCStatistics:
        """Statistics of hand-made samples ``probs`` (N, T, C) (for tests and for users with their own
        stochastic predictions)."""
        n, t, c = probs.shape
        stats = cls.empty(n, c)
        stats.add(np.arange(n), np.transpose(probs, (1, 0, 2)))
        stats.passes = t
        return stats

    def merge(self, other: MCStatistics) -> MCStatistics:
        return MCStatistics(
            self.counts + other.counts,
            self.prob_sum + other.prob_sum,
            self.prob_sq_sum + other.prob_sq_sum,
            self.entropy_sum + other.entropy_sum,
            self.passes + other.passes,
        )


def entropy(probs: np.ndarray) -> np.ndarray:
    """-Σ_c p log p along the last axis, with 0 log 0 = 0."""
    p = np.asarray(probs, dtype=np.float64)
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)
