"""Wrappers: strategies around any strategy, composable in configs (``wrap:``) and in ``select(..., wrap=...)``.

- ``subsample``: the base strategy on a seeded random subset of the candidates (the same mechanism as the
  ``subset`` parameter of gradnorm, lplgrad, ll4al, coreset, bait and fishermask).
- ``class_balanced``: per-predicted-class quotas that move the labeled histogram toward balance; the base
  strategy runs inside each predicted class.
- ``stochastic``: draw the batch from a scoring strategy's scores (power, softmax or rank sampling) instead of
  taking the top scores.

A wrapper is itself a :class:`~activelab.strategies.base.Strategy`: it declares the union of what its base
needs (outputs, validation, oracle, trainer, ensemble) and runs the base through child contexts that share
the parent's caches, so wrapping never repeats a model pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from .base import ScoreStrategy, Strategy, StrategyParams, get_strategy, query_subsample

_WRAPPERS: dict[str, type[Wrapper]] = {}


def register_wrapper(cls: type[Wrapper]) -> type[Wrapper]:
    _WRAPPERS[cls.name] = cls
    return cls


def available_wrappers() -> list[str]:
    return sorted(_WRAPPERS)


class Wrapper(Strategy):
    """A strategy around a base strategy. Subclasses define ``query`` in terms of ``self.base.run``."""

    def __init__(self, base: Strategy, **params) -> None:
        super().__init__(**params)
        self.base = base

    @property
    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.model_dump(exclude_defaults=True).items()))
        return f"{self.name}{f'[{inner}]' if inner else ''}({self.base.label})"

    # everything the engine reads is the base's, plus what the wrapper itself reads
    @property
    def needs_validation(self) -> bool:  # type: ignore[override]
        return self.base.needs_validation

    @property
    def reads_pool_labels(self) -> bool:  # type: ignore[override]
        return self.base.reads_pool_labels

    @property
    def uses_oracle(self) -> bool:  # type: ignore[override]
        return self.base.uses_oracle

    @property
    def training(self) -> str:  # type: ignore[override]
        return self.base.training

    @property
    def first_round_random(self) -> bool:  # type: ignore[override]
        return self.base.first_round_random

    #: Forward outputs the wrapper itself reads (on top of its base's).
    own_outputs: ClassVar[tuple[str, ...]] = ()

    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(sorted(set(self.base.outputs) | set(self.own_outputs)))

    def ensemble_size(self) -> int:
        return self.base.ensemble_size()

    def subsample_size(self, budget: int) -> int | None:
        return None

    def sized_check(self, n_candidates: int, n_labeled: int, num_classes: int, budget: int) -> None:
        """The base's check on at most as many candidates as this wrapper hands it (class_balanced and stochastic
        hand it fewer or as many; subsample at most its size)."""
        self.base.sized_check(self.inner_candidates(n_candidates), n_labeled, num_classes, budget)

    def inner_candidates(self, n_candidates: int) -> int:
        return n_candidates


@register_wrapper
class Subsample(Wrapper):
    """``subsample``: run the base strategy on a seeded uniform random subset of ``size`` candidates.

    The usual way to make an expensive strategy (BAIT, BADGE, core-set on a huge pool) affordable: cost scales
    with ``size`` instead of the pool. Used by Sener & Savarese (core-set on random subsets), Yoo & Kweon
    (LL4AL, 10,000 candidates) and Ash et al. (BAIT). Complexity: O(N) to draw the subset, then the base
    strategy's cost on ``size`` candidates; model passes run only on the subset. Edge cases: ``size`` at least
    the pool means the whole pool (no draw); ``size`` below the budget is an error; a base with a ``subset`` of
    its own draws that subset from this one (the subsets nest: the smaller one wins).
    """

    name = "subsample"

    class Params(StrategyParams):
        size: int = Field(ge=1, description="candidates drawn (seeded) before the base strategy runs")

    example_params = {"size": 30}

    def query(self, ctx, budget, rng):
        return query_subsample(self.base.run, ctx, self.params.size, budget, rng, what="subsample size")

    def inner_candidates(self, n_candidates: int) -> int:
        return min(self.params.size, n_candidates)


def balanced_quotas(labeled_counts: np.ndarray, available: np.ndarray, budget: int) -> np.ndarray:
    """Per-class quotas for a batch of ``budget`` that moves the labeled histogram toward balance.

    Water-filling: each next label goes to the class with the fewest labels so far (labeled + quota), among the
    classes that still have candidates predicted in them; ties go to the lowest class. This is small-text's
    deficit filling with its clip-and-refill step folded in. O(budget x C).
    """
    level = np.asarray(labeled_counts, dtype=np.float64).copy()
    available = np.asarray(available, dtype=np.int64)
    if available.sum() < budget:
        raise ActivelabError(f"only {available.sum()} candidates for a batch of {budget}")
    quota = np.zeros(len(available), dtype=np.int64)
    for _ in range(budget):
        k = int(np.argmin(np.where(quota < available, level, np.inf)))
        quota[k] += 1
        level[k] += 1
    return quota


@register_wrapper
class ClassBalanced(Wrapper):
    """``class_balanced``: fill the batch class by class so that the labeled histogram moves toward balance,
    running the base strategy inside each predicted class.

    After small-text's ``ClassBalancer`` (Schröder et al.): the candidates are split by the model's predicted
    class; each class gets a quota (:func:`balanced_quotas`: labels go to the classes with the fewest labels so
    far, clipped to the candidates predicted in that class, the rest refilled to other classes); the base
    strategy picks its quota within each class (classes in increasing order, one shared generator, so the
    result is seeded). Best effort: it balances by predicted labels, which are wrong exactly where the model
    is weak (often the rare classes).

    Complexity: one forward pass over the candidates (shared with the base strategy), then the base strategy
    on each class's candidates. Edge cases: a class with no predicted candidate gets no quota (its share moves
    to the others); a class whose quota takes all its candidates is picked whole without running the base (a
    scoring base still records its scores there); a base strategy that needs more candidates than a class has
    (e.g. BAIT's 2b) sees only that class's candidates (and BAIT estimates the pool's Fisher from them); round
    notes the base writes under the same key in several classes keep the last class's value.
    """

    name = "class_balanced"
    own_outputs: ClassVar[tuple[str, ...]] = ("probs",)
    example_params: ClassVar[dict] = {}

    def query(self, ctx, budget, rng):
        predicted = ctx.probs("candidates").argmax(axis=1)
        c = max(ctx.num_classes, int(predicted.max()) + 1)
        labeled = np.bincount(ctx.labeled_labels(), minlength=c)[:c] if len(ctx.labeled) else np.zeros(c, np.int64)
        available = np.bincount(predicted, minlength=c)
        quotas = balanced_quotas(labeled, available, budget)
        ctx.info["class_balanced_quotas"] = quotas.tolist()
        picks = []
        for k in np.flatnonzero(quotas):
            members = np.flatnonzero(predicted == k)
            if quotas[k] == len(members):  # taken whole: no selection to run, but a scoring base still scores it
                if isinstance(self.base, ScoreStrategy):
                    child = ctx.restrict(members)
                    child.set_scores(self.base.scores(child, rng))
                picks.append(members)
                continue
            inner = np.asarray(self.base.run(ctx.restrict(members), int(quotas[k]), rng), dtype=np.int64)
            picks.append(members[inner])
        return np.concatenate(picks).astype(np.int64)


def stochastic_sample(
    scores: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    mode: Literal["power", "softmax", "rank"] = "power",
    temperature: float = 1.0,
) -> np.ndarray:
    """Draw ``budget`` distinct positions with probability proportional to s^(1/T) (power), exp(s/T)
    (softmax) or rank^(-1/T) (rank; rank 1 = the highest score), without replacement, by Gumbel-top-k on the
    log-weights (Kirsch et al., "Stochastic Batch Acquisition", TMLR 2023). O(N log N).

    Edge cases: power needs non-negative scores (an error otherwise; use softmax or rank); positions whose
    weight is zero (score 0 in power mode) come only after every positive one, in random order, so all-zero
    scores give a uniform draw.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ActivelabError("a strategy produced non-finite scores; the model's outputs contain NaN or inf")
    if temperature <= 0:
        raise ActivelabError(f"temperature must be positive; got {temperature}")
    if mode == "power":
        if s.min() < 0:
            raise ActivelabError(
                "power sampling needs non-negative scores, and this strategy's are negative (e.g. margin's "
                "-(p1 - p2)): use mode 'softmax' or 'rank'"
            )
        with np.errstate(divide="ignore"):
            logw = np.log(s) / temperature
    elif mode == "softmax":
        logw = s / temperature
    elif mode == "rank":
        ranks = np.empty(len(s))
        ranks[np.argsort(-s, kind="stable")] = np.arange(1, len(s) + 1)
        logw = -np.log(ranks) / temperature
    else:
        raise ActivelabError(f"unknown mode {mode!r}; use power, softmax or rank")
    keys = logw + rng.gumbel(size=len(s))
    zero = ~np.isfinite(logw)
    keys[zero] = -np.inf
    order = np.argsort(-keys, kind="stable")
    chosen = order[:budget]
    n_pos = int((~zero).sum())
    if n_pos < budget:  # fill with a uniform draw among the zero-weight positions
        fill = rng.permutation(np.flatnonzero(zero))[: budget - n_pos]
        chosen = np.concatenate([order[:n_pos], fill])
    return chosen.astype(np.int64)


@register_wrapper
class Stochastic(Wrapper):
    """``stochastic``: sample the batch from a scoring strategy's scores instead of taking the top ones
    (Kirsch, Farquhar, Atighehchian, Jesson, Branchaud-Charron, Gal: "Stochastic Batch Acquisition: A Simple
    Baseline for Deep Active Learning", TMLR 2023). Modes: ``power`` (p ∝ s^(1/T), the paper's default for
    BALD-like non-negative scores), ``softmax`` (p ∝ exp(s/T)) and ``rank`` (p ∝ rank^(-1/T)).

    The base must be a scoring strategy (margin, entropy, least confidence, the MC-dropout scores, gradnorm,
    lplgrad, ll4al, vaal). Complexity: the base's scoring plus O(N log N). See :func:`stochastic_sample` for
    zero and negative scores.
    """

    name = "stochastic"

    class Params(StrategyParams):
        mode: Literal["power", "softmax", "rank"] = "power"
        temperature: float = Field(1.0, gt=0, description="T: 1 samples proportionally, lower T is greedier")

    example_params = {"mode": "rank"}

    def __init__(self, base: Strategy, **params) -> None:
        if isinstance(base, Wrapper):
            raise ActivelabError(
                f"the stochastic wrapper samples a scoring strategy's scores and cannot wrap {base.label!r}: "
                "list 'stochastic' before the other wrappers (wrap=['stochastic', ('subsample', {...})])"
            )
        if not isinstance(base, ScoreStrategy):
            raise ActivelabError(
                f"the stochastic wrapper needs a scoring strategy (one that ranks candidates by a score); "
                f"{base.label!r} is not one"
            )
        super().__init__(base, **params)

    def query(self, ctx, budget, rng):
        return query_subsample(self._sample, ctx, self.base.subsample_size(budget), budget, rng)

    def _sample(self, ctx, budget, rng):
        """The base's scores on the (possibly subsampled) context, sampled instead of ranked."""
        scores = self.base.scores(ctx, rng)
        ctx.set_scores(scores)
        return stochastic_sample(scores, budget, rng, self.params.mode, self.params.temperature)


WrapSpec = str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]


def _parse_wrap(spec: WrapSpec) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec[0], dict(spec[1])
    if isinstance(spec, Mapping) and "name" in spec:
        extra = set(spec) - {"name", "params"}
        if extra:
            raise ActivelabError(f"a wrapper is {{name: ..., params: {{...}}}}; unknown keys {sorted(extra)}")
        return spec["name"], dict(spec.get("params") or {})
    raise ActivelabError(f"cannot read wrapper {spec!r}: use a name, (name, params) or {{name:, params:}}")


def build_strategy(name: str, params: Mapping[str, Any] | None = None, wrap: Sequence[WrapSpec] = ()) -> Strategy:
    """The strategy ``name`` with ``params``, wrapped by each of ``wrap`` in turn (the first wraps the strategy,
    the next wraps that). Unknown names and parameters are errors that list the valid ones."""
    strategy = get_strategy(name)(**dict(params or {}))
    for spec in wrap:
        wname, wparams = _parse_wrap(spec)
        if wname not in _WRAPPERS:
            raise ActivelabError(f"unknown wrapper {wname!r}; available: {', '.join(available_wrappers())}")
        strategy = _WRAPPERS[wname](strategy, **wparams)
    return strategy
