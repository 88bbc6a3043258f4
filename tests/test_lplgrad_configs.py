"""The LPLgrad experiment configs load, and state the paper's protocol (or the stated CPU reductions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from activelab.config import load_config
from activelab.strategies.base import get_strategy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STRATEGIES = {"random", "entropy", "coreset", "ll4al", "gradnorm", "lplgrad"}


@pytest.mark.parametrize(
    ("name", "dataset", "initial", "subset"),
    [("cifar10", "cifar10", 1000, 10000), ("svhn", "svhn", 500, 25000), ("fashion_mnist", "fashion_mnist", 100, 10000)],
)
def test_config_loads(name, dataset, initial, subset):
    cfg = load_config(CONFIGS / f"lplgrad_{name}.yaml")
    assert cfg.dataset.name == dataset
    assert {s.name for s in cfg.strategies} == STRATEGIES
    assert cfg.loop.initial == cfg.loop.budget == initial and cfg.loop.rounds == 9  # 10 cycles
    for s in cfg.strategies:
        if s.name in ("ll4al", "gradnorm", "lplgrad"):
            assert s.params["subset"] == subset
    trainings = {s.name: get_strategy(s.name).training for s in cfg.strategies}
    assert trainings["lplgrad"] == trainings["ll4al"] == "loss_prediction"
    assert trainings["gradnorm"] == "standard"
    t = cfg.train
    assert t.optimizer == "sgd" and t.momentum == 0.9 and t.weight_decay == 5e-4 and t.restart == "warm"
    assert t.loss_weight == 1.0 and t.loss_margin == 1.0
    # the detach epoch and the milestone sit at 60% and 80% of training, as 120 and 160 of 200
    assert t.detach_epoch == pytest.approx(0.6 * t.epochs) and t.milestones == [int(0.8 * t.epochs)]
    if name != "fashion_mnist":
        assert cfg.model.name == "resnet18" and cfg.model.stem == "cifar" and not cfg.model.dropout
        assert (t.lr, t.batch_size, t.epochs, t.augment) == (0.1, 128, 200, "crop_flip")
        assert cfg.loop.runs == 5
    else:
        assert cfg.model.name == "lenet" and cfg.loop.runs >= 3
