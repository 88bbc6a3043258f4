"""Imbalance protocols as data options: "clip to K classes" (GALAXY, LabelBench) and symmetric label noise
(LabelBench's model, for DIRECT's noise claim)."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from ..errors import ActivelabError
from .arrays import ArrayDataset, dataset_labels


def clip_labels(labels: np.ndarray, k: int) -> np.ndarray:
    """Keep classes 0..k-2 and merge every other class into class k-1."""
    if k < 2:
        raise ActivelabError(f"dataset.clip_to must be at least 2; got {k}")
    return np.minimum(np.asarray(labels, dtype=np.int64), k - 1)


def clip_classes(dataset: Dataset, k: int) -> ArrayDataset:
    """The dataset with classes 0..k-2 kept and all others merged into class k-1 (named "other")."""
    if not isinstance(dataset, ArrayDataset):
        raise ActivelabError("dataset.clip_to needs an in-memory dataset (the built-in ones); relabel yours first")
    if k > dataset.num_classes:
        raise ActivelabError(f"dataset.clip_to={k} but the dataset has only {dataset.num_classes} classes")
    names = list(dataset.classes[: k - 1]) + ["other"]
    return ArrayDataset(
        dataset.x,
        clip_labels(dataset_labels(dataset), k),
        dataset.mean.tolist(),
        dataset.std.tolist(),
        names,
        dataset.name,
    )


def symmetric_noise(labels: np.ndarray, p: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Flip round(p N) labels, drawn uniformly, each to a uniformly random other class."""
    if not 0.0 <= p < 1.0:
        raise ActivelabError(f"bias.label_noise must lie in [0, 1); got {p}")
    labels = np.asarray(labels, dtype=np.int64).copy()
    n_flip = int(round(p * len(labels)))
    if n_flip == 0:
        return labels
    if num_classes < 2:
        raise ActivelabError("label noise needs at least two classes")
    idx = rng.choice(len(labels), n_flip, replace=False)
    shift = rng.integers(1, num_classes, n_flip)
    labels[idx] = (labels[idx] + shift) % num_classes
    return labels
