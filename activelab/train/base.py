"""The trainer contract: what the experiment runner calls to train a model on the labeled set."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class TrainResult:
    """What one call of :meth:`Trainer.fit` did.

    - ``epochs``: epochs run (fewer than ``cfg.epochs`` when ``until_train_accuracy`` stopped training).
    - ``seconds``: wall time of training alone (batches, forward, backward, steps); validation excluded.
    - ``eval_seconds``: wall time spent evaluating on the validation set.
    - ``train_accuracy``: accuracy on the last epoch's training batches, measured in train mode.
    - ``val_accuracy``: validation accuracy of the model that ``fit`` leaves behind (None without validation).
    - ``selected_epoch``: the 1-based epoch whose weights were kept (``epochs`` when ``select_by`` is "last").
    - ``history``: one dict per epoch: epoch (1-based), lr, loss (mean over samples), train_accuracy and
      val_accuracy (None when validation was not evaluated that epoch).
    """

    epochs: int
    seconds: float
    eval_seconds: float
    train_accuracy: float
    val_accuracy: float | None
    selected_epoch: int
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Trainer(Protocol):
    """A training procedure. Implementations live in modules that expose ``TRAINER`` (see ``get_trainer``)."""

    name: str

    def prepare(self, model: nn.Module) -> None:
        """Attach what this trainer needs to ``model`` (extra heads, hooks); called before loading weights."""
        ...

    def fit(
        self,
        model: nn.Module,
        dataset: Dataset,
        indices: np.ndarray,
        cfg: TrainConfig,
        *,
        generator: torch.Generator,
        validation: tuple[Dataset, np.ndarray] | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> TrainResult:
        """Train ``model`` as given (warm start or re-init is the caller's choice) on ``dataset[indices]``."""
        ...
