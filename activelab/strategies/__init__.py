"""Query strategies. Each module registers its strategies with :func:`~activelab.strategies.base.register`;
every module of this package is imported when the registry is first read."""

from .base import Strategy, StrategyParams, available_strategies, get_strategy, register, top_scores

__all__ = ["Strategy", "StrategyParams", "available_strategies", "get_strategy", "register", "top_scores"]
