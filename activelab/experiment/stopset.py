"""The stop set of a run and the per-round quantities the stopping criteria read (:mod:`activelab.stopping`).

The stop set is a fixed, seeded sample of ``loop.stop_set`` pool samples outside the initial labeled set, the
same for every strategy of a run (its labels are never read). After each round's training the model's
predictions on it are stored in the round's ``info["stop_set"]`` with the kappa against the previous round's
predictions and the mean uncertainty (least confidence and entropy), so a resumed run and ``report`` can
recompute every criterion.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ExperimentConfig
from ..stopping import StopWhen, cohen_kappa, should_stop, stop_set_uncertainty
from .seeding import numpy_rng
from .setup import RunData


def stop_set_indices(cfg: ExperimentConfig, data: RunData) -> np.ndarray:
    """Sorted pool indices of the run's stop set (empty when ``loop.stop_set`` is 0)."""
    size = cfg.loop.stop_set
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    outside = np.setdiff1d(np.arange(len(data.pool)), data.initial)
    rng = numpy_rng(cfg.loop.seed, data.run, "stop-set")
    return np.sort(rng.choice(outside, size=min(size, len(outside)), replace=False)).astype(np.int64)


def stop_set_entry(
    model: torch.nn.Module, data: RunData, indices: np.ndarray, previous: list[int] | None, batch_size: int
) -> dict:
    """The round's ``info["stop_set"]``: predictions, kappa to ``previous`` (None at the first trained round),
    mean least confidence and mean entropy."""
    from ..inference.forward import forward_pass, softmax

    logits = forward_pass(model, data.pool, indices, batch_size).logits.astype(np.float64)
    probs = softmax(logits)
    preds = probs.argmax(axis=1)
    kappa = None if previous is None else cohen_kappa(np.asarray(previous), preds, probs.shape[1])
    return {
        "predictions": preds.tolist(),
        "kappa": kappa,
        "least_confidence": stop_set_uncertainty(probs, "least_confidence"),
        "entropy": stop_set_uncertainty(probs, "entropy"),
    }


def history(infos: list[dict], measure: str = "least_confidence") -> tuple[list, list]:
    """(kappas, uncertainties) per round from the rounds' info dicts (None where a round has no stop set)."""
    entries = [info.get("stop_set") or {} for info in infos]
    return [e.get("kappa") for e in entries], [e.get(measure) for e in entries]


def stop_reason(rule: StopWhen | None, infos: list[dict], labeled_counts: list[int]) -> str | None:
    """The criterion of ``rule`` that fires at the latest round, given every round so far."""
    if rule is None:
        return None
    kappas, uncertainties = history(infos, rule.measure)
    return should_stop(rule, kappas, uncertainties, labeled_counts)
