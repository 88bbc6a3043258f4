"""Biased, class-imbalanced training pools.

:func:`biased_pool_indices` draws the pool from the training labels left after the validation split was carved
(see :mod:`activelab.data.splits`); every kind is a pure function of the labels, the config and ``rng``.

Kinds (``BiasConfig.kind``), with ``n_c`` the number of images of class ``c`` available and ``r = ratio``:

``none``
    every image, or a uniform random subsample of ``pool_size`` images.
``step`` (FK's protocol; docs/methods.md, Protocols)
    the majority classes keep all their images; ``int(N_major / r)`` images are drawn uniformly from the
    *union* of the minority classes (``minority``, default the upper half of the classes:
    ``classes[ceil(C/2):]``, i.e. 5..9 of 10), so per-class minority counts vary from draw to draw, as in the
    paper. The draw is capped at the minority images available (so ``r = 1`` keeps everything when the
    minority is smaller than the majority).
``random_classes`` (FK's ImageNet construction)
    a seeded random ``floor(C / 2)`` of the classes keep ``int(n_c / r)`` of their images, each class drawn
    separately; the other classes keep everything.
``long_tail``
    class ``c`` (natural order: class 0 is the head, the last class the tail) keeps
    ``int(n_min * r ** (-k / (C - 1)))`` images, ``k`` its rank among the classes present and ``n_min`` the
    size of the smallest class, so that every class can supply its quota and the head-to-tail ratio is
    ``r`` (up to rounding).
``counts``
    exactly ``counts[c]`` images of each listed class; classes not listed are dropped. With
    ``dataset.classes`` the keys are the relabelled classes (``0..k-1``).

Fields that a kind does not read raise an error instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import ActivelabError
from .splits import _as_labels


class BiasSpec(Protocol):
    """What the builders read: the fields of ``BiasConfig`` (any object with these attributes will do)."""

    kind: str
    ratio: float
    minority: list[int] | None
    counts: dict[int, int] | None
    pool_size: int | None


@dataclass(frozen=True)
class Bias:
    """A plain :class:`BiasSpec`, for callers without a config."""

    kind: str = "none"
    ratio: float = 1.0
    minority: list[int] | None = None
    counts: dict[int, int] | None = None
    pool_size: int | None = None


def biased_pool_indices(labels: np.ndarray, cfg: BiasSpec, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices into ``labels`` forming the training pool described by ``cfg`` (a ``BiasConfig``
    or a :class:`Bias`)."""
    labels = _as_labels(labels)
    _check_fields(cfg)
    if cfg.kind not in _BUILDERS:
        raise ActivelabError(f"unknown bias kind {cfg.kind!r}; known: {', '.join(_BUILDERS)}")
    chosen = _BUILDERS[cfg.kind](labels, cfg, rng)
    return np.sort(np.asarray(chosen, dtype=np.int64))


def pool_class_counts(labels: np.ndarray, indices: np.ndarray, num_classes: int | None = None) -> dict[int, int]:
    """Images per class in ``labels[indices]``.

    The keys are every class present in ``labels`` (so a class that the pool lost entirely counts 0), or
    ``0..num_classes-1`` when ``num_classes`` is given; sorted.
    """
    labels = _as_labels(labels)
    size = max(int(labels.max()) + 1 if labels.size else 0, num_classes or 0)
    counts = np.bincount(labels[np.asarray(indices, dtype=np.int64)], minlength=size)
    keys = range(num_classes) if num_classes is not None else np.unique(labels)
    return {int(c): int(counts[c]) for c in keys}


def minority_classes(counts: dict[int, int]) -> list[int]:
    """Classes with fewer than half the images of the largest class (sorted); empty for a balanced pool."""
    if not counts:
        return []
    largest = max(counts.values())
    return sorted(int(c) for c, n in counts.items() if n < 0.5 * largest)


def _check_fields(cfg: BiasSpec) -> None:
    if cfg.pool_size is not None and cfg.kind != "none":
        raise ActivelabError(f"bias.pool_size is only read by bias kind 'none', not {cfg.kind!r}: remove it")
    if cfg.minority is not None and cfg.kind != "step":
        raise ActivelabError(f"bias.minority is only read by bias kind 'step', not {cfg.kind!r}: remove it")
    if cfg.ratio != 1.0 and cfg.kind in ("none", "counts"):
        raise ActivelabError(f"bias.ratio is not read by bias kind {cfg.kind!r}: remove it")


def _none(labels: np.ndarray, cfg: BiasSpec, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    if cfg.pool_size is None:
        return np.arange(n)
    if cfg.pool_size > n:
        raise ActivelabError(f"bias.pool_size {cfg.pool_size} exceeds the {n} training images available")
    return rng.choice(n, size=cfg.pool_size, replace=False)


def _step(labels: np.ndarray, cfg: BiasSpec, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(labels)
    if cfg.minority is None:
        minority = classes[(len(classes) + 1) // 2 :]
    else:
        minority = np.unique(np.asarray(cfg.minority, dtype=np.int64))
        missing = sorted(set(minority.tolist()) - set(classes.tolist()))
        if missing:
            raise ActivelabError(
                f"bias.minority classes {missing} have no training images; classes: {classes.tolist()}"
            )
    is_minor = np.isin(labels, minority)
    major_idx, minor_idx = np.flatnonzero(~is_minor), np.flatnonzero(is_minor)
    if len(major_idx) == 0 or len(minor_idx) == 0:
        raise ActivelabError(
            f"bias kind 'step' needs both majority and minority classes; minority = {minority.tolist()}, "
            f"classes present = {classes.tolist()}"
        )
    take = min(int(len(major_idx) / cfg.ratio), len(minor_idx))
    return np.concatenate([major_idx, rng.choice(minor_idx, size=take, replace=False)])


def _random_classes(labels: np.ndarray, cfg: BiasSpec, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(labels)
    reduced = set(rng.permutation(classes)[: len(classes) // 2].tolist())
    parts = []
    for c in classes:  # increasing class order, so the draws are a pure function of rng
        idx = np.flatnonzero(labels == c)
        if int(c) in reduced:
            idx = rng.choice(idx, size=int(len(idx) / cfg.ratio), replace=False)
        parts.append(idx)
    return np.concatenate(parts)


def _long_tail(labels: np.ndarray, cfg: BiasSpec, rng: np.random.Generator) -> np.ndarray:
    classes, available = np.unique(labels, return_counts=True)
    targets = long_tail_counts(len(classes), int(available.min()), cfg.ratio)
    parts = [
        rng.choice(np.flatnonzero(labels == c), size=t, replace=False) for c, t in zip(classes, targets, strict=True)
    ]
    return np.concatenate(parts)


def long_tail_counts(num_classes: int, n_max: int, ratio: float) -> list[int]:
    """``int(n_max * ratio ** (-k / (num_classes - 1)))`` for ranks ``k = 0..num_classes-1``."""
    if num_classes == 1:
        return [n_max]
    return [int(n_max * ratio ** (-k / (num_classes - 1))) for k in range(num_classes)]


def _counts(labels: np.ndarray, cfg: BiasSpec, rng: np.random.Generator) -> np.ndarray:
    if not cfg.counts:
        raise ActivelabError("bias kind 'counts' needs counts: {class: number, ...}")
    parts = []
    for c, n in sorted(cfg.counts.items()):
        idx = np.flatnonzero(labels == c)
        if n < 0:
            raise ActivelabError(f"bias.counts[{c}] = {n} must be >= 0")
        if n > len(idx):
            raise ActivelabError(
                f"bias.counts asks for {n} images of class {c} but only {len(idx)} are available "
                "(after the validation split): lower it"
            )
        parts.append(rng.choice(idx, size=n, replace=False))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


_BUILDERS = {
    "none": _none,
    "step": _step,
    "random_classes": _random_classes,
    "long_tail": _long_tail,
    "counts": _counts,
}
