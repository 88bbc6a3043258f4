"""The strategy contract and registry.

A strategy is a class with a name, a pydantic ``Params`` model (unknown parameters are an error) and a
``query`` method. ``query`` asks the :class:`~activelab.query.context.QueryContext` for the model outputs it
needs (the context computes each once, batched, on the chosen device) and hands the arrays to a pure function
of arrays plus an explicit ``numpy.random.Generator``. It returns positions into ``ctx.candidates``. Strategy
modules import neither :mod:`activelab.inference` nor :mod:`activelab.train`: the context is the only door.

Class attributes the engine reads:
- ``needs_validation``: ``select`` refuses to run without a validation set.
- ``reads_pool_labels``: only oracle ablations may set it; the context refuses pool labels otherwise.
- ``uses_oracle``: the strategy asks for labels of its own picks during the selection (``ctx.ask``).
- ``outputs``: the forward outputs it reads (``"probs"``, ``"embeddings"``), so that one pass computes them all.
- ``training``: which trainer the experiment runner must use for this strategy (``"standard"`` or another name
  registered in :mod:`activelab.train`).
- ``first_round_random``: with no labels yet, draw the first batch at random (uncertainty baselines).
- ``ensemble_size()``: the runner trains that many models per round and passes them as ``ctx.ensemble_models``.

Strategies written outside activelab work everywhere a name does: ``"my_package.module:MyStrategy"`` names a
:class:`Strategy` subclass (imported on use, so it also works in worker processes and Ray tasks).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ActivelabError
from ..plugins import load_plugin

if TYPE_CHECKING:
    from ..query.context import QueryContext


class StrategyParams(BaseModel):
    """Base of every strategy's parameters: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Strategy:
    name: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    needs_validation: ClassVar[bool] = False
    reads_pool_labels: ClassVar[bool] = False
    uses_oracle: ClassVar[bool] = False
    outputs: ClassVar[tuple[str, ...]] = ("probs",)
    training: ClassVar[str] = "standard"
    first_round_random: ClassVar[bool] = False
    #: Cheap parameters for the contract test and examples (e.g. few MC samples).
    example_params: ClassVar[dict] = {}

    def __init__(self, **params) -> None:
        self.params = parse_params(type(self), params)

    @property
    def label(self) -> str:
        return self.name

    def query(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        """Return ``budget`` distinct positions into ``ctx.candidates``."""
        raise NotImplementedError

    def subsample_size(self, budget: int) -> int | None:
        """Candidates this strategy selects among (a seeded random subset; None: all). Strategies with a
        ``subset`` parameter get it through the same mechanism as the ``subsample`` wrapper."""
        return getattr(self.params, "subset", None)

    def run(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        """What the engine and the wrappers call: :meth:`query`, on a seeded candidate subset when
        :meth:`subsample_size` asks for one."""
        return query_subsample(self.query, ctx, self.subsample_size(budget), budget, rng)

    def check_size(self, n_candidates: int, n_labeled: int, num_classes: int, budget: int) -> None:
        """Raise an :class:`ActivelabError` with the sizes it would need if a query on ``n_candidates``
        candidates (after this strategy's own subset) cannot run within its limits; nothing by default. Called
        by the query engine (through :meth:`sized_check`) before any model pass, and by an experiment's preflight
        before any training."""

    def sized_check(self, n_candidates: int, n_labeled: int, num_classes: int, budget: int) -> None:
        """:meth:`check_size` on the candidates this strategy's query would see (its subset applied)."""
        size = self.subsample_size(budget)
        n = n_candidates if size is None else min(size, n_candidates)
        self.check_size(n, n_labeled, num_classes, budget)

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
    """The strategy class registered as ``name``, or a plugin named ``"package.module:Class"``."""
    if ":" in name:
        cls = load_plugin(name, "strategy")
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ActivelabError(f"strategy {name!r} is not a subclass of activelab.strategies.Strategy")
        return cls
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


class ScoreStrategy(Strategy):
    """A strategy that scores every candidate and labels the top ``budget`` (ties broken by the seeded
    generator). Its scores are recorded (``select(..., return_scores=True)``) and can be sampled from instead
    of ranked (the ``stochastic`` wrapper)."""

    def scores(self, ctx: QueryContext, rng: np.random.Generator) -> np.ndarray:
        """(N,) scores of ``ctx.candidates``; higher is more informative."""
        raise NotImplementedError

    def query(self, ctx, budget, rng):
        scores = self.scores(ctx, rng)
        ctx.set_scores(scores)
        return top_scores(scores, budget, rng)


def query_subsample(
    query: Callable[[QueryContext, int, np.random.Generator], np.ndarray],
    ctx: QueryContext,
    size: int | None,
    budget: int,
    rng: np.random.Generator,
    *,
    what: str = "subset",
) -> np.ndarray:
    """``query(ctx, budget, rng)`` (a strategy's ``query``, or a base's ``run`` so that subsets nest) on a seeded
    uniform subset of ``size`` candidates (all of them when ``size`` is None or covers them; no random draw
    then), as positions into ``ctx.candidates``. The child context shares the parent's caches. ``what`` names
    ``size`` in the error for a subset smaller than the budget."""
    positions = candidate_subset(len(ctx.candidates), size, budget, rng, what=what)
    if len(positions) == len(ctx.candidates):
        return np.asarray(query(ctx, budget, rng), dtype=np.int64)
    return positions[np.asarray(query(ctx.restrict(positions), budget, rng), dtype=np.int64)]


def candidate_subset(
    n_candidates: int, size: int | None, budget: int, rng: np.random.Generator, *, what: str = "subset"
) -> np.ndarray:
    """Sorted positions of a uniform random subset of ``size`` candidates (all of them if the pool is smaller
    or ``size`` is None). The subset must hold at least ``budget`` samples."""
    if size is None or size >= n_candidates:
        return np.arange(n_candidates, dtype=np.int64)
    if size < budget:
        raise ActivelabError(f"{what}={size} is smaller than the budget {budget}: raise {what} to at least the budget")
    return np.sort(rng.choice(n_candidates, size=size, replace=False)).astype(np.int64)
