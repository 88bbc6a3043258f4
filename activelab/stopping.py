"""Stopping criteria: pure functions of per-round quantities that say at which round labelling more stops paying.

- Stabilising predictions (Bloodgood & Vijay-Shanker, CoNLL 2009): Cohen's kappa between the predictions of
  successive models on a fixed unlabeled stop set; stop once the mean kappa of the last ``window`` rounds is at
  least ``threshold`` (theirs: 3 rounds, 0.99).
- Overall uncertainty (Zhu, Wang & Hovy 2008): the mean uncertainty of the model on the stop set (least
  confidence 1 - max p, or entropy) at or below a threshold.
- Budget: the labeled count reaches a budget.

Rounds are indexed as the experiment's records: round r is the model trained on the labels of rounds 0..r.
Each ``*_stop_round`` returns the first round at which the criterion fires, or None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import ActivelabError

Measure = Literal["least_confidence", "entropy"]


def cohen_kappa(a: np.ndarray, b: np.ndarray, num_classes: int | None = None) -> float:
    """Cohen's kappa of two label vectors; 1.0 when both are the same constant (chance agreement 1)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ActivelabError(f"kappa needs two non-empty label vectors of one length; got {a.shape} and {b.shape}")
    k = int(max(a.max(), b.max()) + 1) if num_classes is None else num_classes
    observed = float(np.mean(a == b))
    chance = float(np.dot(np.bincount(a, minlength=k), np.bincount(b, minlength=k))) / len(a) ** 2
    if chance >= 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return (observed - chance) / (1.0 - chance)


def successive_kappas(predictions: Sequence[np.ndarray]) -> list[float | None]:
    """kappa[r] between the stop-set predictions of rounds r - 1 and r (None for round 0)."""
    out: list[float | None] = [None]
    for prev, cur in zip(predictions[:-1], predictions[1:]):
        out.append(cohen_kappa(prev, cur))
    return out


def stabilizing_predictions_stop_round(
    kappas: Sequence[float | None], window: int = 3, threshold: float = 0.99
) -> int | None:
    """First round r whose last ``window`` kappas (rounds r - window + 1 .. r, all defined) average >= threshold."""
    if window < 1:
        raise ActivelabError(f"window must be >= 1; got {window}")
    for r in range(len(kappas)):
        recent = kappas[max(0, r - window + 1) : r + 1]
        if len(recent) == window and all(k is not None for k in recent) and np.mean(recent) >= threshold:
            return r
    return None


def stop_set_uncertainty(probs: np.ndarray, measure: Measure = "least_confidence") -> float:
    """Mean uncertainty of (N, C) probabilities: 1 - max p (least confidence) or the entropy (nats)."""
    probs = np.asarray(probs, dtype=np.float64)
    if measure == "least_confidence":
        return float(np.mean(1.0 - probs.max(axis=1)))
    if measure == "entropy":
        from scipy.special import entr

        return float(np.mean(entr(probs).sum(axis=1)))
    raise ActivelabError(f"unknown uncertainty measure {measure!r}: use least_confidence or entropy")


def uncertainty_stop_round(uncertainties: Sequence[float | None], threshold: float) -> int | None:
    """First round whose stop-set uncertainty is at or below ``threshold``."""
    for r, u in enumerate(uncertainties):
        if u is not None and u <= threshold:
            return r
    return None


def budget_stop_round(labeled_counts: Sequence[int], budget: int) -> int | None:
    """First round whose labeled count reaches ``budget``."""
    for r, n in enumerate(labeled_counts):
        if n >= budget:
            return r
    return None


class StopWhen(BaseModel):
    """A config's ``loop.stop_when``: end a run at the first round where one of the given criteria fires."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stabilizing_kappa: float | None = Field(None, gt=0, le=1, description="mean kappa threshold (e.g. 0.99)")
    window: int = Field(3, ge=1, description="rounds averaged by the stabilising-predictions criterion")
    uncertainty_below: float | None = Field(None, ge=0, description="mean stop-set uncertainty threshold")
    measure: Measure = "least_confidence"
    labels: int | None = Field(None, ge=1, description="stop once this many samples are labeled")


def stop_rounds(
    kappas: Sequence[float | None],
    uncertainties: Sequence[float | None],
    labeled_counts: Sequence[int],
    *,
    window: int = 3,
    kappa_threshold: float = 0.99,
    uncertainty_threshold: float | None = None,
    budget: int | None = None,
) -> dict[str, int | None]:
    """Where each criterion would have stopped a run with these per-round values."""
    return {
        "stabilizing_predictions": stabilizing_predictions_stop_round(kappas, window, kappa_threshold),
        "uncertainty": None
        if uncertainty_threshold is None
        else uncertainty_stop_round(uncertainties, uncertainty_threshold),
        "budget": None if budget is None else budget_stop_round(labeled_counts, budget),
    }


def should_stop(
    rule: StopWhen, kappas: Sequence[float | None], uncertainties: Sequence[float | None], labeled_counts: Sequence[int]
) -> str | None:
    """The name of a criterion of ``rule`` that has fired by the last round given (checked each round, this is the
    round it first fires), or None."""
    if rule.stabilizing_kappa is not None and (
        stabilizing_predictions_stop_round(kappas, rule.window, rule.stabilizing_kappa) is not None
    ):
        return "stabilizing_predictions"
    if rule.uncertainty_below is not None and uncertainty_stop_round(uncertainties, rule.uncertainty_below) is not None:
        return "uncertainty"
    if rule.labels is not None and budget_stop_round(labeled_counts, rule.labels) is not None:
        return "budget"
    return None
