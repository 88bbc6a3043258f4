"""``activelab.select``: pick the samples worth labeling with one call (a thin facade over the query engine)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .data.contract import check_model_and_data
from .data.indices import as_pool_indices
from .errors import ActivelabError
from .inference.device import resolve_device
from .query.engine import RoundSeed, run_query
from .strategies.wrappers import WrapSpec, build_strategy


def select(
    strategy: str,
    model: nn.Module | Sequence[nn.Module],
    pool: Dataset,
    *,
    labeled: Sequence[int] | np.ndarray | None = None,
    budget: int,
    validation: Dataset | None = None,
    seed: int | RoundSeed = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    taps: Sequence[str] | None = None,
    classifier: str | None = None,
    wrap: Sequence[WrapSpec] = (),
    oracle: Callable[[np.ndarray], Sequence[int]] | None = None,
    embeddings: np.ndarray | None = None,
    return_scores: bool = False,
    **params,
) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
    """Pick ``budget`` pool samples to label next.

    Args:
        strategy: a name from :func:`activelab.available_strategies`, or ``"package.module:Class"`` for a
            strategy of your own.
        model: any ``torch.nn.Module`` returning class logits (moved to ``device`` and left there), or a list
            of separately trained models for ensemble strategies (``ensemble=`` their number).
        pool: a torch ``Dataset`` of ``(x, y)``; ``y`` of the labeled samples is their known label (read by
            strategies that use the labeled set's classes); ``y`` of the others is ignored (it may be -1) except
            by oracle ablations.
        labeled: pool indices already labeled (or a boolean mask of the pool's length); never returned.
        budget: how many samples to pick.
        validation: a labeled dataset, required by strategies that need one (``fk``).
        seed: same inputs and seed give the same indices.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        batch_size: batch size of the model passes.
        taps: names of layers whose activations a strategy reads (built-in models have defaults).
        classifier: name of the final linear layer (default: the model's own, else the last ``nn.Linear``).
        wrap: wrappers applied in turn, e.g. ``[("subsample", {"size": 5000}), "class_balanced"]``
            (:func:`activelab.strategies.wrappers.available_wrappers`).
        oracle: ``fn(pool_indices) -> labels`` for strategies that learn labels of their own picks during the
            selection (galaxy, direct); every asked sample is among the returned ones.
        embeddings: an (N, d) array over the whole pool for strategies that can use your embeddings.
        return_scores: also return the strategy's scores as an array over the pool (NaN where not scored), or
            None for strategies without per-sample scores.
        **params: the strategy's parameters; an unknown one is an error that lists the valid ones.

    Returns:
        numpy int64 array of ``budget`` unique pool indices, none of them in ``labeled``
        (``(indices, scores)`` with ``return_scores=True``).
    """
    instance = build_strategy(strategy, params, wrap)
    models = list(model) if isinstance(model, Sequence) and not isinstance(model, nn.Module) else [model]
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise ActivelabError("model must be a torch.nn.Module (or a list of them for an ensemble)")
    dev = resolve_device(device)
    for m in models:
        m.to(dev)
    labeled_idx = as_pool_indices(labeled, len(pool))
    check_model_and_data(models[0], pool, dev)  # the (x, y) and (B, C) logits contracts, on two samples
    round_seed = seed if isinstance(seed, RoundSeed) else RoundSeed.from_int(seed)
    result = run_query(
        instance,
        models[0],
        pool,
        labeled_idx,
        budget,
        round_seed,
        validation=validation,
        batch_size=batch_size,
        taps=taps,
        classifier=classifier,
        ensemble_models=models if len(models) > 1 else None,
        oracle=oracle,
        embeddings=embeddings,
    )
    return (result.indices, result.scores) if return_scores else result.indices
