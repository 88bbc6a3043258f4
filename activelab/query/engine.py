"""The selection engine shared by ``activelab.select`` and the experiment runner.

One function, :func:`run_query`, runs a (possibly wrapped) strategy for one round: it checks the inputs,
applies the first-round rule, seeds torch inside a forked RNG state (CPU and CUDA state restored), builds the
query context with the outputs the strategy declared, runs the strategy, checks its answer (and the oracle's
ledger) and returns the picks with their scores and the round's notes, made JSON-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ActivelabError
from ..inference.device import seeded_torch
from ..jsonable import jsonable
from .context import Oracle, QueryContext

if TYPE_CHECKING:
    from ..strategies.base import Strategy


@dataclass(frozen=True)
class RoundSeed:
    """The randomness of one selection: the numpy generator the strategy draws from and the seed of torch's
    global generator while it runs (dropout masks)."""

    rng: np.random.Generator
    torch_seed: int

    @classmethod
    def from_int(cls, seed: int) -> RoundSeed:
        """``select(seed=s)``: a generator seeded with ``s``; torch's seed is its first draw."""
        rng = np.random.default_rng(seed)
        return cls(rng, int(rng.integers(2**31)))


@dataclass
class QueryResult:
    indices: np.ndarray  # (budget,) pool indices
    scores: np.ndarray | None  # (pool size,) the strategy's scores by pool index (NaN where not scored), or None
    info: dict = field(default_factory=dict)
    asked: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # labels revealed in-round


def unlabeled_indices(pool_size: int, labeled: np.ndarray) -> np.ndarray:
    mask = np.ones(pool_size, dtype=bool)
    mask[labeled] = False
    return np.flatnonzero(mask)


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def run_query(
    strategy: Strategy,
    model: nn.Module,
    pool: Dataset,
    labeled: np.ndarray,
    budget: int,
    seed: RoundSeed,
    *,
    validation: Dataset | None = None,
    batch_size: int = 512,
    taps: Sequence[str] | None = None,
    classifier: str | None = None,
    ensemble_models: Sequence[nn.Module] | None = None,
    oracle: Oracle | None = None,
    embeddings: np.ndarray | None = None,
) -> QueryResult:
    """Run ``strategy`` once: ``budget`` unique pool indices, none labeled (see the module docstring)."""
    labeled = np.asarray(labeled, dtype=np.int64)
    candidates = unlabeled_indices(len(pool), labeled)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ActivelabError(f"budget must be a positive integer; got {budget!r}")
    if budget > len(candidates):
        raise ActivelabError(
            f"budget {budget} is larger than the unlabeled pool ({len(candidates)} of {len(pool)} samples)"
        )
    if strategy.needs_validation and validation is None:
        raise ActivelabError(f"strategy {strategy.label!r} needs a validation set: pass validation=...")
    if embeddings is not None and len(embeddings) != len(pool):
        raise ActivelabError(f"embeddings has {len(embeddings)} rows for a pool of {len(pool)} samples")
    info: dict = {}
    rng = seed.rng
    if len(labeled) == 0 and strategy.first_round_random:
        positions = rng.choice(len(candidates), size=budget, replace=False).astype(np.int64)
        info["first_round"] = "random"
        return QueryResult(candidates[positions], None, info)
    ctx = QueryContext(
        model,
        pool,
        candidates,
        labeled,
        validation,
        batch_size=batch_size,
        taps=taps,
        classifier=classifier,
        allow_pool_labels=strategy.reads_pool_labels,
        strategy_name=f"strategy {strategy.label!r}",
        info=info,
        ensemble_models=ensemble_models,
        outputs=strategy.outputs,
        oracle=oracle,
        user_embeddings=embeddings,
    )
    # size limits before any model pass, also where a wrapper would run one first (e.g. class_balanced's split)
    strategy.sized_check(len(candidates), len(labeled), ctx.num_classes, int(budget))
    with seeded_torch(seed.torch_seed, _cuda_devices()):
        positions = np.asarray(strategy.run(ctx, int(budget), rng), dtype=np.int64)
    if positions.shape != (budget,) or len(np.unique(positions)) != budget:
        raise RuntimeError(f"strategy {strategy.label!r} returned {positions.shape} positions, not {budget} unique")
    if positions.min() < 0 or positions.max() >= len(candidates):
        raise RuntimeError(f"strategy {strategy.label!r} returned positions outside the candidates")
    selected = candidates[positions]
    asked = ctx.asked()
    if ctx.oracle_calls:
        missing = np.setdiff1d(asked, selected)
        if len(missing):
            raise RuntimeError(
                f"strategy {strategy.label!r} asked the oracle for {len(missing)} samples it did not return: "
                "every asked sample is spent from the budget"
            )
        info["oracle_calls"] = ctx.oracle_calls
        info["oracle_asked"] = int(len(asked))
    info["forward_passes"] = ctx.forward_passes
    return QueryResult(selected, ctx.scores_by_pool_index(), jsonable(info), asked)
