"""Training procedures, looked up by name.

A strategy declares the trainer it needs (``Strategy.training``); the runner calls ``get_trainer(name)`` and
uses its ``prepare`` and ``fit`` (see :class:`~activelab.train.base.Trainer`). Trainer modules are imported
only when asked for, so an optional trainer cannot break the others.
"""

from __future__ import annotations

import importlib

from ..errors import ActivelabError
from .base import Trainer, TrainResult

#: trainer name -> module exposing ``TRAINER``
TRAINERS: dict[str, str] = {
    "standard": "activelab.train.supervised",
    "loss_prediction": "activelab.train.loss_prediction",
}

__all__ = ["TRAINERS", "TrainResult", "Trainer", "available_trainers", "get_trainer"]


def available_trainers() -> list[str]:
    return sorted(TRAINERS)


def get_trainer(name: str) -> Trainer:
    """The trainer registered under ``name`` (its module's ``TRAINER``)."""
    if name not in TRAINERS:
        raise ActivelabError(f"unknown trainer {name!r}; available trainers: {', '.join(available_trainers())}")
    module = importlib.import_module(TRAINERS[name])
    trainer = getattr(module, "TRAINER", None)
    if trainer is None:
        raise ActivelabError(f"module {TRAINERS[name]} defines no TRAINER for trainer {name!r}")
    return trainer
