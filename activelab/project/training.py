"""Training between rounds: the project's model, the labeled training share, the held-out share."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import ActivelabError
from ..train.supervised import StandardTrainer

if TYPE_CHECKING:
    from .core import Project
    from .sources import ImageTransform


def build_project_model(name: str, num_classes: int, transform: ImageTransform) -> nn.Module:
    """A built-in model or the user's ``module:factory`` (``activelab.models.build_model``), for the images of
    ``transform``."""
    from ..config import ModelConfig
    from ..models import build_model

    return build_model(ModelConfig(name=name), num_classes, transform.channels, transform.size)


class _ProgressTrainer(StandardTrainer):
    """The standard trainer, reporting after every epoch."""

    def __init__(self, callback: Callable[[dict], None] | None, epochs: int) -> None:
        self.callback, self.epochs, self.epoch = callback, epochs, 0

    def _train_epoch(self, model, dataset, order, cfg, epoch, optimizer, generator, fill):
        correct, loss_sum = super()._train_epoch(model, dataset, order, cfg, epoch, optimizer, generator, fill)
        if self.callback is not None:
            n = max(len(order), 1)
            self.callback(
                {"epoch": epoch + 1, "epochs": self.epochs, "loss": loss_sum / n, "train_accuracy": correct / n}
            )
        return correct, loss_sum


def fit_project_model(project: Project, progress: Callable[[dict], None] | None = None, **overrides: Any) -> dict:
    """Train a fresh model on the labeled training share (see :meth:`Project.fit`); store and return the record."""
    from ..config import TrainConfig
    from .core import PoolImages, _train_config

    started = time.time()
    train, val = project.labeled_split()
    if not train:
        raise ActivelabError(
            f"no labeled image to train on ({len(val)} labeled are held out for validation): label more first"
        )
    cfg: TrainConfig = _train_config({**project.store.get_meta("train", {}), **overrides})
    if cfg.select_by == "validation" and not val:
        cfg = cfg.model_copy(update={"select_by": "last"})
    entries = train + val
    rows = np.asarray([r for _, r, _ in entries], dtype=np.int64)
    labels = np.asarray([c for _, _, c in entries], dtype=np.int64)
    data = PoolImages(project.pixels(), rows, labels, project.classes)
    number = len(project.store.trainings()) + 1
    seed = int(project.store.get_meta("seed", 0)) * 100_003 + number
    torch.manual_seed(seed)
    model = project.build_model()
    generator = torch.Generator().manual_seed(seed)
    trainer = _ProgressTrainer(progress, cfg.epochs)
    validation = (data, np.arange(len(train), len(entries))) if val else None
    result = trainer.fit(model, data, np.arange(len(train)), cfg, generator=generator, validation=validation)
    checkpoint = f"checkpoints/model_{number:04d}.pt"
    target = project.folder / checkpoint
    tmp = target.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "classes": project.classes, "training": number}, tmp)
    os.replace(tmp, target)
    record = {
        "started": started,
        "finished": time.time(),
        "labels": len(entries),
        "train_size": len(train),
        "val_size": len(val),
        "val_accuracy": result.val_accuracy,
        "train_accuracy": result.train_accuracy,
        "checkpoint": checkpoint,
        "history": result.history,
    }
    record["id"] = project.store.add_training(record)
    return record
