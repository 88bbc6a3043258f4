"""Uniform random sampling: the baseline every other strategy has to beat."""

from __future__ import annotations

import numpy as np

from .base import Strategy, register


def random_positions(n_candidates: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """``budget`` distinct positions in ``range(n_candidates)``, uniformly. O(N) time and memory."""
    return rng.choice(n_candidates, size=budget, replace=False).astype(np.int64)


@register
class RandomSampling(Strategy):
    """Uniform random sampling of the unlabeled pool.

    Complexity: O(N) time and memory, no model pass. No paper; every paper's baseline.
    """

    name = "random"

    def query(self, ctx, budget, rng):
        return random_positions(len(ctx.candidates), budget, rng)
