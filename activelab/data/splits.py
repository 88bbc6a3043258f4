"""Class-balanced validation splits and class restriction.

The experiment protocol is: load the training split, carve a class-balanced validation set from it with
:func:`carve_validation`, then draw the (possibly biased) pool from the rest with
:func:`activelab.data.bias.biased_pool_indices`. Indices returned by the bias functions index the *rest*, so
the pool's indices into the training split are ``rest[pool]``; validation and pool are disjoint by
construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ActivelabError
from .arrays import ArrayDataset, dataset_labels


def carve_validation(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``labels`` into a class-balanced validation set and the rest.

    Every class present in ``labels`` gives exactly ``per_class`` indices, drawn uniformly without
    replacement (classes visited in increasing order, so the draw is a pure function of ``rng``'s state).

    Returns ``(validation, rest)``: sorted, disjoint int64 index arrays whose union is
    ``arange(len(labels))``.
    Raises :class:`ActivelabError` naming the class when one has fewer than ``per_class`` samples.
    """
    labels = _as_labels(labels)
    if per_class < 0:
        raise ActivelabError(f"validation.per_class must be >= 0, got {per_class}")
    classes, counts = np.unique(labels, return_counts=True)
    short = [(int(c), int(n)) for c, n in zip(classes, counts, strict=True) if n < per_class]
    if short:
        listing = ", ".join(f"class {c} has {n}" for c, n in short)
        raise ActivelabError(
            f"cannot carve {per_class} validation samples per class: {listing}; "
            f"lower validation.per_class to at most {min(n for _, n in short)}"
        )
    chosen = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in classes]
    validation = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[validation] = False
    return validation, np.flatnonzero(mask).astype(np.int64)


class ClassSubset(Dataset):
    """A subset of any torch ``Dataset`` with labels mapped to ``0..k-1`` (made by :func:`restrict_classes`).

    Exposes ``targets`` (the mapped labels, numpy int64), ``classes`` and ``indices`` (into the parent).
    """

    def __init__(self, dataset: Dataset, indices: np.ndarray, mapping: dict[int, int], classes: list[str]) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.mapping = dict(mapping)
        parent = dataset_labels(dataset)[self.indices]
        self.targets = np.asarray([mapping[int(c)] for c in parent], dtype=np.int64)
        self.classes = list(classes)
        self.name = getattr(dataset, "name", "")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int):
        x, _ = self.dataset[int(self.indices[i])]
        return x, int(self.targets[i])

    def __getattr__(self, attr: str):
        # forward descriptive attributes (mean, std, in_channels, image_size, ...) to the parent dataset
        if attr in ("dataset", "indices", "mapping", "targets", "classes", "name"):
            raise AttributeError(attr)
        return getattr(self.dataset, attr)


def restrict_classes(dataset: Dataset, classes: Sequence[int]) -> Dataset:
    """Keep only the samples of ``classes``, relabelled ``0..k-1`` in the order given.

    ``restrict_classes(ds, [3, 1])`` maps class 3 to 0 and class 1 to 1; class names follow the same order.
    An :class:`ArrayDataset` gives an :class:`ArrayDataset` (images copied, normalisation kept); any other
    dataset with ``targets`` (e.g. an ImageFolder) gives a :class:`ClassSubset` view.
    """
    classes = [int(c) for c in classes]
    if not classes:
        raise ActivelabError("dataset.classes is empty: list the classes to keep, e.g. [0, 1, 2, 3]")
    if len(set(classes)) != len(classes):
        raise ActivelabError(f"dataset.classes {classes} lists a class twice")
    names = list(getattr(dataset, "classes", []) or [])
    labels = dataset_labels(dataset)
    num_classes = len(names) if names else int(labels.max()) + 1
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ActivelabError(
            f"dataset.classes {bad} do not exist: {getattr(dataset, 'name', '') or 'the dataset'} has "
            f"classes 0..{num_classes - 1}"
        )
    if not names:
        names = [str(c) for c in range(num_classes)]
    lookup = np.full(max(num_classes, int(labels.max()) + 1), -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    new_labels = lookup[labels]
    keep = np.flatnonzero(new_labels >= 0)
    new_names = [names[c] for c in classes]
    if isinstance(dataset, ArrayDataset):
        idx = torch.as_tensor(keep)
        return ArrayDataset(
            dataset.x[idx],
            new_labels[keep],
            dataset.mean.tolist(),
            dataset.std.tolist(),
            new_names,
            dataset.name,
        )
    return ClassSubset(dataset, keep, {c: i for i, c in enumerate(classes)}, new_names)


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ActivelabError(f"labels must be a 1-d array of class indices, got shape {labels.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise ActivelabError("labels must be non-negative integers (class indices)")
    return labels.astype(np.int64, copy=False)
