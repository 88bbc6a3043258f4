"""One query round of a project: the pool of not-yet-seen images, ``activelab.select``, the round's record."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ActivelabError
from ..inference.forward import forward_pass, softmax

if TYPE_CHECKING:
    from ..strategies.base import Strategy
    from .core import Project


class StrategyFallbackWarning(UserWarning):
    """The strategy could not do its job this round and picked at random instead (the round records why)."""


def _select(
    strategy: Strategy,
    model: torch.nn.Module,
    pool,
    labeled: np.ndarray,
    budget: int,
    validation,
    seed: int,
    device: str,
    oracle=None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The picks, their scores (None for strategies without) and the round's notes.

    The engine that ``activelab.select`` runs, called directly because ``select`` hands back indices and scores
    but not the strategy's notes (``fallback`` and its reason, which the project must record and show).
    """
    from ..inference.device import resolve_device
    from ..query.engine import RoundSeed
    from ..query.engine import run_query as engine_query

    model.to(resolve_device(device))
    result = engine_query(
        strategy, model, pool, labeled, budget, RoundSeed.from_int(seed), validation=validation, oracle=oracle
    )
    scores = None if result.scores is None else np.asarray(result.scores, dtype=np.float64)[result.indices]
    return np.asarray(result.indices, dtype=np.int64), scores, dict(result.info)


def _guesses(model: torch.nn.Module, pool, positions: np.ndarray) -> np.ndarray:
    """The model's class probabilities at ``positions`` of the pool, float64."""
    return softmax(forward_pass(model, pool, positions).logits.astype(np.float64))


def _validation_picks(
    probs: np.ndarray | None, candidates: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class * C`` candidate positions: half per class by the model's guesses (most confident first),
    the rest a uniform random sample, so that rare classes are found and the set is not only easy cases."""
    budget = min(per_class * num_classes, len(candidates))
    chosen: list[int] = []
    taken = np.zeros(len(candidates), dtype=bool)
    if probs is not None:
        by_guess = (per_class + 1) // 2
        guess = probs.argmax(1)
        for c in range(num_classes):
            mine = np.flatnonzero((guess == c) & ~taken)
            mine = mine[np.argsort(-probs[mine, c], kind="stable")][:by_guess]
            taken[mine] = True
            chosen += mine.tolist()
    rest = np.flatnonzero(~taken)
    extra = rng.choice(rest, size=max(budget - len(chosen), 0), replace=False)
    positions = np.asarray(chosen[:budget] + extra.tolist(), dtype=np.int64)
    score = probs[positions].max(1) if probs is not None else np.full(len(positions), np.nan)
    return positions, score


def run_query(
    project: Project,
    n: int,
    strategy: str,
    *,
    seed: int | None = None,
    validation_per_class: int | None = None,
    device: str = "cpu",
    oracle: Callable[[list[str]], Sequence[str]] | None = None,
    **params: Any,
) -> int:
    """Query, record the round (one transaction) and return its number; see :meth:`Project.query`.

    ``oracle``: ``fn(file ids) -> class names``, for strategies that ask for labels of some of their picks
    during the selection (in sub-batches). Its answers are stored as labels (``who="oracle"``) unless they are
    already the files' current labels (the labeling page writes them itself).
    """
    from ..strategies.wrappers import build_strategy
    from .core import PoolImages

    classes = project.classes
    index = {c: i for i, c in enumerate(classes)}
    latest = project.store.latest_labels()
    files = project.store.files()
    ids, rows, labels = [], [], []
    for f in files:
        state = latest.get(f["id"])
        kind = state["kind"] if state is not None else None
        if kind in ("skip", "unsure"):
            continue  # seen by a person: not offered again, not trained on
        ids.append(f["id"])
        rows.append(f["row"])
        labels.append(index[state["label"]] if kind == "label" and state["label"] in index else -1)
    labels_arr = np.asarray(labels, dtype=np.int64)
    labeled = np.flatnonzero(labels_arr >= 0)
    candidates = np.flatnonzero(labels_arr < 0)
    if len(candidates) == 0:
        raise ActivelabError("every image is labeled, skipped or marked unsure: nothing left to query")
    pool = PoolImages(project.pixels(), np.asarray(rows, dtype=np.int64), labels_arr, classes)
    round_no = len(project.store.rounds()) + 1
    seed = int(project.store.get_meta("seed", 0)) * 1_000_003 + round_no if seed is None else int(seed)
    checkpoint = project.latest_checkpoint()
    model = project.load_model(checkpoint)
    info: dict = {}
    scores: np.ndarray | None = None
    if validation_per_class is not None:
        if validation_per_class < 1:
            raise ActivelabError(f"validation_per_class must be >= 1; got {validation_per_class}")
        probs = _guesses(model, pool, candidates) if model is not None else None
        positions, scores = _validation_picks(
            probs, candidates, validation_per_class, len(classes), np.random.default_rng(seed)
        )
        picked = candidates[positions]
        kind, used = "validation", "validation_per_class"
        params = {"per_class": validation_per_class}
        info["purpose"] = (
            f"a held-out set of about {validation_per_class} per class (by the model's guesses and a random sample): "
            "measures accuracy, and strategies that need a validation set (fk) read it; never trained on"
        )
    else:
        kind, used = "query", strategy
        instance = build_strategy(strategy, params)
        if n > len(candidates):
            n = len(candidates)
        validation = None
        if instance.needs_validation:
            _, val = project.labeled_split()
            if not val:
                raise ActivelabError(
                    f"strategy {strategy!r} needs a labeled validation set and the project has none: run a "
                    "'label k per class' round first (activelab project query DIR --validation-per-class 5), "
                    "label it, then query again"
                )
            val_rows = np.asarray([r for _, r, _ in val], dtype=np.int64)
            validation = PoolImages(project.pixels(), val_rows, np.asarray([c for _, _, c in val]), classes)
        if model is None:
            torch.manual_seed(seed)
            model = project.build_model()
            if strategy != "random":
                info["fallback"] = "random"
                info["fallback_reason"] = "no trained model yet: label this batch, then train"
            used, params, instance = "random", {}, build_strategy("random")
        pool_oracle = None
        if oracle is not None and instance.uses_oracle:  # without one, the strategy decides (ctx.has_oracle)

            def pool_oracle(indices: np.ndarray) -> list[int]:
                fids = [ids[int(i)] for i in indices]
                names = list(oracle(fids))
                if len(names) != len(fids):
                    raise ActivelabError(f"the oracle answered {len(names)} labels for {len(fids)} images")
                for name in names:
                    if name not in index:
                        raise ActivelabError(f"the oracle answered unknown class {name!r}; classes: {classes}")
                current = project.store.latest_labels(fids)
                new = [
                    (f, "label", name)
                    for f, name in zip(fids, names)
                    if not (f in current and current[f]["kind"] == "label" and current[f]["label"] == name)
                ]
                if new:
                    project.store.add_labels(new, who="oracle", source="oracle", round_=round_no)
                return [index[name] for name in names]

        picked, scores, notes = _select(instance, model, pool, labeled, n, validation, seed, device, pool_oracle)
        info.update(notes)
        if info.get("fallback") and used != "random":
            warnings.warn(
                f"strategy {strategy!r} fell back to {info['fallback']} picks this round: "
                f"{info.get('fallback_reason', 'no reason given')}",
                StrategyFallbackWarning,
                stacklevel=3,
            )
    probs = _guesses(model, pool, picked) if checkpoint is not None else None
    if scores is None and probs is not None:
        top2 = np.sort(probs, axis=1)[:, -2:]
        scores = 1.0 - (top2[:, 1] - top2[:, 0])
        info["score"] = "1 - margin of the model's top two guesses (display only; the strategy gives no scores)"
    picks = []
    for i, pos in enumerate(picked):
        guesses = []
        if probs is not None:
            order = np.argsort(-probs[i])[:3]
            guesses = [[classes[int(c)], round(float(probs[i, c]), 4)] for c in order]
        score = None if scores is None or not np.isfinite(scores[i]) else float(scores[i])
        picks.append((ids[int(pos)], score, guesses))
    info["pool"] = {"candidates": int(len(candidates)), "labeled": int(len(labeled))}
    return project.store.add_round(kind, used, params, len(picks), checkpoint, info, picks)
