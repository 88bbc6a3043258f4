"""Everything about a config that can be checked before the first job, so that a mistake gives one message
(and no experiment directory) instead of one traceback per job."""

from __future__ import annotations

import torch

from ..config import ExperimentConfig, StrategyConfig
from ..errors import ActivelabError, ConfigError


def check_strategy(scfg: StrategyConfig, where: str = "strategies") -> None:
    """The strategy exists (a built-in name or an importable ``module:attr``), its parameters and wrappers are
    valid, and so is its first-round strategy."""
    from ..strategies.wrappers import build_strategy

    try:
        build_strategy(scfg.name, scfg.params, [w.model_dump() for w in scfg.wrap])
        if scfg.first_round:
            build_strategy(scfg.first_round.name, scfg.first_round.params)
    except ActivelabError as exc:
        raise ConfigError(f"{where} ({scfg.label}): {exc}") from None


def check_strategies(cfg: ExperimentConfig) -> None:
    for i, s in enumerate(cfg.strategies):
        check_strategy(s, f"strategies[{i}]")


def preflight(cfg: ExperimentConfig) -> None:
    """Check strategies, device, dataset, bias, budget and model on run 0 (its data built once) and the first
    batch through a freshly built model; raises an :class:`ActivelabError` naming the problem."""
    from ..data.contract import check_model_and_data
    from ..inference.device import resolve_device
    from ..strategies.wrappers import build_strategy
    from ..train import get_trainer
    from .setup import new_model, prepare_run

    check_strategies(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ActivelabError(
            f"device {cfg.device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    data = prepare_run(cfg, 0)
    labels_ok = all(0 <= int(c) < data.num_classes for c in data.class_counts)
    if not labels_ok:
        raise ActivelabError(
            f"the training labels are outside 0..{data.num_classes - 1} (classes {sorted(data.class_counts)})"
        )
    n_pool, initial = len(data.pool), min(cfg.loop.initial, len(data.pool))
    for s in cfg.strategies:
        strategy = build_strategy(s.name, s.params, [w.model_dump() for w in s.wrap])
        # the size limits (e.g. probcover's max_points, batchbald's max_candidates) before any training, on the
        # candidates of each strategy's first round (the most it will see)
        labeled = initial
        if s.first_round is not None:
            first_budget = s.first_round.budget or cfg.loop.budget
            build_strategy(s.first_round.name, s.first_round.params).sized_check(
                n_pool - labeled, labeled, data.num_classes, first_budget
            )
            labeled = min(n_pool, labeled + first_budget)
        strategy.sized_check(n_pool - labeled, labeled, data.num_classes, cfg.loop.budget)
        trainer = get_trainer(strategy.training)
        with torch.random.fork_rng(devices=[]):
            model = new_model(cfg, data)
            trainer.prepare(model)
    with torch.random.fork_rng(devices=[]):
        model = new_model(cfg, data).to(device)
    check_model_and_data(model, data.pool, device, data.num_classes)
