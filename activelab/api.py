"""``activelab.select``: pick the samples worth labeling with one call."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import ActivelabError
from .inference.context import QueryContext
from .strategies.base import Strategy, get_strategy


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ActivelabError("device='cuda' was asked for but CUDA is not available here; use device='cpu'")
    return device


def unlabeled_indices(pool_size: int, labeled: Sequence[int] | np.ndarray | None) -> np.ndarray:
    labeled = np.asarray([] if labeled is None else labeled, dtype=np.int64)
    if labeled.size and (labeled.min() < 0 or labeled.max() >= pool_size):
        raise ActivelabError(f"labeled indices must lie in [0, {pool_size}); got {labeled.min()}..{labeled.max()}")
    mask = np.ones(pool_size, dtype=bool)
    mask[labeled] = False
    return np.flatnonzero(mask)


def run_strategy(
    strategy: Strategy,
    model: nn.Module,
    pool: Dataset,
    labeled: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    validation: Dataset | None = None,
    batch_size: int = 512,
    taps: Sequence[str] | None = None,
    classifier: str | None = None,
    info: dict | None = None,
    ensemble_models: Sequence[nn.Module] | None = None,
) -> np.ndarray:
    """Run ``strategy`` once and check its answer; the shared core of ``select`` and the experiment runner."""
    candidates = unlabeled_indices(len(pool), labeled)
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ActivelabError(f"budget must be a positive integer; got {budget!r}")
    if budget > len(candidates):
        raise ActivelabError(
            f"budget {budget} is larger than the unlabeled pool ({len(candidates)} of {len(pool)} samples)"
        )
    if strategy.needs_validation and validation is None:
        raise ActivelabError(f"strategy {strategy.name!r} needs a validation set: pass validation=...")
    ctx = QueryContext(
        model,
        pool,
        candidates,
        np.asarray(labeled, dtype=np.int64),
        validation,
        batch_size=batch_size,
        taps=taps,
        classifier=classifier,
        allow_pool_labels=strategy.reads_pool_labels,
        strategy_name=f"strategy {strategy.name!r}",
        info=info,
        ensemble_models=ensemble_models,
    )
    positions = np.asarray(strategy.query(ctx, int(budget), rng), dtype=np.int64)
    if positions.shape != (budget,) or len(np.unique(positions)) != budget:
        raise RuntimeError(f"strategy {strategy.name!r} returned {positions.shape} positions, not {budget} unique")
    if positions.min() < 0 or positions.max() >= len(candidates):
        raise RuntimeError(f"strategy {strategy.name!r} returned positions outside the candidates")
    return candidates[positions]


def select(
    strategy: str,
    model: nn.Module,
    pool: Dataset,
    *,
    labeled: Sequence[int] | np.ndarray | None = None,
    budget: int,
    validation: Dataset | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    taps: Sequence[str] | None = None,
    classifier: str | None = None,
    **params,
) -> np.ndarray:
    """Pick ``budget`` pool samples to label next.

    Args:
        strategy: a name from :func:`activelab.available_strategies`.
        model: any ``torch.nn.Module`` returning class logits. It is moved to ``device`` and left there.
        pool: a torch ``Dataset`` of ``(x, y)``; ``y`` is ignored (it may be -1) except by oracle ablations.
        labeled: pool indices already labeled; they are never returned.
        budget: how many samples to pick.
        validation: a labeled dataset, required by strategies that need one (``fk``).
        seed: same inputs and seed give the same indices.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        batch_size: batch size of the model passes.
        taps: names of layers whose activations a strategy reads (built-in models have defaults).
        classifier: name of the final linear layer (default: the model's own, else the last ``nn.Linear``).
        **params: the strategy's parameters; an unknown one is an error that lists the valid ones.

    Returns:
        numpy int64 array of ``budget`` unique pool indices, none of them in ``labeled``.
    """
    cls = get_strategy(strategy)
    instance = cls(**params)
    model.to(resolve_device(device))
    labeled_arr = np.asarray([] if labeled is None else labeled, dtype=np.int64)
    rng = np.random.default_rng(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(int(rng.integers(2**31)))  # strategies that draw from torch (dropout masks) are seeded
    try:
        return run_strategy(instance, model, pool, labeled_arr, budget, rng, validation, batch_size, taps, classifier)
    finally:
        torch.random.set_rng_state(torch_state)
