"""Which pool sample was labeled in which round."""

from __future__ import annotations

from pathlib import Path

import numpy as np

UNLABELED = -1


class PoolState:
    """For each of ``size`` pool samples, the round in which it was labeled, or ``UNLABELED``.

    Round 0 is the initial labeled set. The state can be rebuilt from the per-round selections that the
    experiment store keeps, and saved to / loaded from an ``.npz`` file for auditing a round by hand.
    """

    def __init__(self, size: int) -> None:
        self.labeled_round = np.full(size, UNLABELED, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.labeled_round)

    def label(self, indices: np.ndarray, round_: int) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        if len(np.unique(indices)) != len(indices):
            raise ValueError("indices to label contain duplicates")
        already = indices[self.labeled_round[indices] != UNLABELED]
        if already.size:
            raise ValueError(f"pool samples {already[:10].tolist()} are already labeled")
        self.labeled_round[indices] = round_

    @property
    def labeled(self) -> np.ndarray:
        return np.flatnonzero(self.labeled_round != UNLABELED)

    @property
    def unlabeled(self) -> np.ndarray:
        return np.flatnonzero(self.labeled_round == UNLABELED)

    def labeled_in(self, round_: int) -> np.ndarray:
        return np.flatnonzero(self.labeled_round == round_)

    @property
    def rounds(self) -> int:
        """The last round in which anything was labeled (-1 when nothing is)."""
        return int(self.labeled_round.max()) if len(self) else -1

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, labeled_round=self.labeled_round)

    @classmethod
    def load(cls, path: str | Path) -> PoolState:
        with np.load(path) as f:
            state = cls(len(f["labeled_round"]))
            state.labeled_round[:] = f["labeled_round"]
        return state

    @classmethod
    def from_selections(cls, size: int, selections: dict[int, np.ndarray]) -> PoolState:
        state = cls(size)
        for round_ in sorted(selections):
            state.label(selections[round_], round_)
        return state
