"""The strategy contract and registry.

A strategy is a class with a name, a pydantic ``Params`` model (unknown parameters are an error) and a
``query`` method. ``query`` asks the :class:`~activelab.inference.context.QueryContext` for the model outputs it
needs (the context computes each once, batched, on the chosen device) and hands the arrays to a pure function
of arrays plus an explicit ``numpy.random.Generator``. It returns positions into ``ctx.candidates``.

Class attributes the engine reads:
- ``needs_validation``: ``select`` refuses to run without a validation set.
- ``reads_pool_labels``: only oracle ablations may set it; the context refuses pool labels otherwise.
- ``training``: which trainer the experiment runner must use for this strategy (``"standard"`` or another name
  registered in :mod:`activelab.train`).
- ``first_round_random``: with no labels yet, draw the first batch at random (uncertainty baselines).
- ``ensemble_size()``: the runner trains that many models per round and passes them as ``ctx.ensemble_models``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ActivelabError

if TYPE_CHECKING:
    from ..inference.context import QueryContext


class StrategyParams(BaseModel):
    """Base of every strategy's parameters: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Strategy:
    name: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    needs_validation: ClassVar[bool] = False
    reads_pool_labels: ClassVar[bool] = False
    training: ClassVar[str] = "standard"
    first_round_random: ClassVar[bool] = False
    #: Cheap parameters for the contract test and examples (e.g. few MC samples).
    example_params: ClassVar[dict] = {}

    def __init__(self, **params) -> None:
        self.params = parse_params(type(self), params)

    def query(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        """Return ``budget`` distinct positions into ``ctx.candidates``."""
        raise NotImplementedError

    def ensemble_size(self) -> int:
        """How many separately trained models the experiment runner keeps for this strategy (1: just the
        model). Members beyond the first reach ``query`` as ``ctx.ensemble_models`` (all E, first included)."""
        return 1


_REGISTRY: dict[str, type[Strategy]] = {}
_LOADED = False


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"strategy name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import every module of the strategies package so that each registers its strategies."""
    global _LOADED
    if _LOADED:
        return
    from .. import strategies

    for module in pkgutil.iter_modules(strategies.__path__):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"{strategies.__name__}.{module.name}")
    _LOADED = True


def available_strategies() -> list[str]:
    """Names accepted by :func:`activelab.select` and by experiment configs, sorted. Names starting with an
    underscore (strategies registered by tests or experiments of one's own) still work but are not listed."""
    _load_all()
    return sorted(name for name in _REGISTRY if not name.startswith("_"))


def get_strategy(name: str) -> type[Strategy]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ActivelabError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}") from None


def parse_params(cls: type[Strategy], params: dict) -> StrategyParams:
    try:
        return cls.Params(**params)
    except ValidationError as exc:
        valid = ", ".join(cls.Params.model_fields) or "(none)"
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '?'}: {err['msg']}" for err in exc.errors())
        raise ActivelabError(
            f"bad parameters for strategy {cls.name!r}: {problems}. Valid parameters: {valid}"
        ) from None


def top_scores(scores: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the ``budget`` highest scores; ties broken by a seeded random permutation."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise ActivelabError("a strategy produced non-finite scores; the model's outputs contain NaN or inf")
    tie_break = rng.permutation(len(scores))
    order = np.lexsort((tie_break, -scores))
    return order[:budget].astype(np.int64)


def candidate_subset(n_candidates: int, size: int | None, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a uniform random subset of ``size`` candidates (all of them if the pool is smaller
    or ``size`` is None). The subset must hold at least ``budget`` samples."""
    if size is None or size >= n_candidates:
        return np.arange(n_candidates, dtype=np.int64)
    if size < budget:
        raise ActivelabError(f"subset={size} is smaller than the budget {budget}: raise subset to at least the budget")
    return np.sort(rng.choice(n_candidates, size=size, replace=False)).astype(np.int64)
