"""The FK paper's protocol configs load, and list the paper's method set with its numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from activelab.config import load_config
from activelab.strategies.base import get_strategy

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("fk_*.yaml"))
METHODS = {
    "random",
    "varR_E1_K128",
    "varR_E4_K32",
    "VAAL",
}


def test_every_protocol_has_a_config():
    names = {p.stem for p in CONFIGS}
    expected = {f"fk_{d}_r{r}" for d in ("mnist", "fashion_mnist", "svhn") for r in (1, 100)} | {"fk_imagenet_r100"}
    assert expected <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_with_the_paper_method_set(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    keys = {s.label: s for s in cfg.strategies}
    assert METHODS <= set(keys)
    assert keys["varR_E1_K128"].params == {"mc_samples": 128, "ensemble": 1}
    assert keys["varR_E4_K32"].params == {"mc_samples": 32, "ensemble": 4}
    fk = {k: s for k, s in keys.items() if s.name == "fk"}
    params = [get_strategy("fk")(**s.params).params for s in fk.values()]
    assert {p.similarity for p in params} == {"features", "fisher"}
    assert {p.resolved_estimator for p in params} == {None, "argmax", "p_hat", "oracle"}
    assert sum(1 for p in params if p.resolved_estimator == "p_hat" and p.taps is not None) == 1  # short L
    ablation = [s for s in fk.values() if s.init == "random"]
    assert len(ablation) == 1 and ablation[0].params["estimator"] == "p_hat"
    assert cfg.init == "rotation" and cfg.loop.initial == 0 and cfg.loop.rounds == 10
    assert cfg.train.select_by != "test"


def test_mnist_protocol_numbers():
    cfg = load_config(next(p for p in CONFIGS if p.stem == "fk_mnist_r100"))
    assert (cfg.dataset.name, cfg.model.name, cfg.validation.per_class) == ("mnist", "lenet", 1000)
    assert (cfg.bias.kind, cfg.bias.ratio, cfg.bias.minority) == ("step", 100, [5, 6, 7, 8, 9])
    assert (cfg.loop.budget, cfg.loop.rounds, cfg.loop.runs) == (125, 10, 10)
    t = cfg.train
    assert (t.optimizer, t.lr, t.momentum, t.batch_size, t.epochs, t.milestones) == (
        "sgd",
        0.05,
        0.5,
        25,
        50,
        [15, 30, 45],
    )
    p = cfg.pretrain
    assert (p.epochs, p.lr, p.momentum, p.batch_size, p.milestones) == (8, 0.05, 0.5, 25, [3, 6])
    keys = {s.label: s for s in cfg.strategies}
    assert keys["R_zg_phat_L20"].params["taps"] == ["conv2"]
