"""In-memory datasets: images as a uint8 tensor, normalised batch by batch.

Holding pools as uint8 tensors keeps even SVHN train+extra (604k x 3 x 32 x 32) under 2 GiB, and lets training,
evaluation and inference slice whole batches instead of going through per-image Python transforms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """Images ``x`` (N, C, H, W) uint8 or float, labels ``y`` (N,) int64, with per-channel normalisation.

    ``dataset[i]`` gives ``(float image, int label)`` as a torch ``Dataset`` should; ``batch(indices)`` gives
    a whole normalised batch at once (the fast path used by training and inference).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | np.ndarray | Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        classes: Sequence[str] | None = None,
        name: str = "",
    ) -> None:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W) or (N, H, W); got shape {tuple(x.shape)}")
        y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
        if len(y) != len(x):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x = x
        self.y = y
        channels = x.shape[1]
        self.mean = torch.tensor(mean if mean is not None else [0.0] * channels, dtype=torch.float32)
        self.std = torch.tensor(std if std is not None else [1.0] * channels, dtype=torch.float32)
        self.classes = list(classes) if classes is not None else [str(c) for c in range(int(y.max()) + 1)]
        self.name = name

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    @property
    def targets(self) -> np.ndarray:
        return self.y.numpy()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.x.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def batch(self, indices: np.ndarray | torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(indices, slice):
            indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return self._normalise(self.x[indices]), self.y[indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(np.asarray([i]))
        return x[0], int(y[0])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return ArrayDataset(self.x[idx], self.y[idx], self.mean.tolist(), self.std.tolist(), self.classes, self.name)

    def with_labels(self, y: np.ndarray) -> ArrayDataset:
        """The same images with other labels (used to check that strategies ignore pool labels)."""
        return ArrayDataset(self.x, y, self.mean.tolist(), self.std.tolist(), self.classes, self.name)


def iter_batches(dataset: Dataset, indices: np.ndarray, batch_size: int):
    """Yield ``(x, y)`` batches of ``dataset`` at ``indices`` in order.

    ``ArrayDataset`` is sliced directly; any other torch ``Dataset`` goes through a ``DataLoader`` over a
    ``Subset`` (no shuffling, so the order matches ``indices``).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(dataset, ArrayDataset) or hasattr(dataset, "batch"):
        for start in range(0, len(indices), batch_size):
            yield dataset.batch(indices[start : start + batch_size])
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices.tolist()),
        batch_size=batch_size,
        shuffle=False,
        generator=torch.Generator(),  # leave the global RNG alone: no shuffling happens anyway
    )
    for x, y in loader:
        yield x, torch.as_tensor(y)


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of every sample of ``dataset``, without loading images when the dataset (or, for a
    ``torch.utils.data.Subset``, the dataset under it) exposes them; only a dataset that exposes no labels is
    read sample by sample."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    for attr in ("targets", "labels", "y"):
        if hasattr(dataset, attr):
            value = getattr(dataset, attr)
            if isinstance(value, torch.Tensor):
                value = value.numpy()
            return np.asarray(value, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)
