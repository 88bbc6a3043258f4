"""Optimisers and per-epoch learning-rate schedules (linear warm-up, then step decay at milestones).

The schedule is stepped once per epoch. With base rate ``lr``, warm-up ``W`` epochs and milestones ``M``, the
rate used during 0-based epoch ``e`` is::

    lr(e) = lr * min(1, (e + 1) / W) * gamma ** #{m in M : m <= e}

so the first warm-up epoch runs at lr/W and epoch W-1 reaches lr; milestones count epochs from 0 as torch's
``MultiStepLR`` does (milestone 15 means epochs 0-14 run at lr, epoch 15 onwards at lr·gamma). Warm-up and
milestones overlap multiplicatively if a milestone falls inside the warm-up.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ActivelabError


class EpochSchedule:
    """The learning-rate multiplier of 0-based epoch ``e`` (picklable, for ``LambdaLR``)."""

    def __init__(self, milestones: Sequence[int] = (), gamma: float = 0.1, warmup_epochs: int = 0) -> None:
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_epochs = int(warmup_epochs)

    def __call__(self, epoch: int) -> float:
        factor = self.gamma ** bisect.bisect_right(self.milestones, epoch)
        if self.warmup_epochs > 0:
            factor *= min(1.0, (epoch + 1) / self.warmup_epochs)
        return factor


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """A fresh optimiser from ``cfg`` (a ``TrainConfig`` or ``PretrainConfig``).

    ``sgd``: ``torch.optim.SGD(lr, momentum, weight_decay)``. ``adam``: ``torch.optim.Adam(lr,
    weight_decay)`` with torch's default betas; ``momentum`` is not read.
    """
    name = getattr(cfg, "optimizer", "sgd")
    weight_decay = getattr(cfg, "weight_decay", 0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=weight_decay)
    raise ActivelabError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> LambdaLR:
    """The per-epoch schedule of ``cfg`` (``milestones``, ``gamma``, optional ``warmup_epochs``).

    Call ``scheduler.step()`` once after each epoch.
    """
    schedule = EpochSchedule(cfg.milestones, cfg.gamma, getattr(cfg, "warmup_epochs", 0))
    return LambdaLR(optimizer, lr_lambda=schedule)
