"""The FisherMask protocol configs load, validate, and say what docs/methods.md (FisherMask protocol) says."""

from __future__ import annotations

from pathlib import Path

import pytest

from activelab.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = ["fishermask_fashion_mnist_imbalanced", "fishermask_cifar10_imbalanced", "fishermask_fashion_mnist_balanced"]
STRATEGIES = {"random", "entropy", "margin", "least_confidence", "kcenter", "badge", "bait", "fishermask"}


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_with_the_protocol(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.dataset.classes == [0, 1, 2, 3]
    assert cfg.bias.kind == "counts" and sum(cfg.bias.counts.values()) == 5750
    if "imbalanced" in name:
        assert cfg.bias.counts == {0: 250, 1: 5000, 2: 250, 3: 250}
    else:
        assert max(cfg.bias.counts.values()) - min(cfg.bias.counts.values()) <= 1
    assert (cfg.loop.initial, cfg.loop.budget, cfg.loop.rounds, cfg.loop.runs) == (250, 250, 22, 5)
    assert cfg.loop.initial + cfg.loop.budget * cfg.loop.rounds == 5750
    assert cfg.train.optimizer == "adam" and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.restart == "reinit" and cfg.train.until_train_accuracy == pytest.approx(0.99)
    assert {s.name for s in cfg.strategies} == STRATEGIES
