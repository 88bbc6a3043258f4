"""activelab: deep active learning on PyTorch, built for biased and class-imbalanced pools."""

from .api import select
from .errors import ActivelabError, ConfigError, DatasetNotFoundError
from .strategies.base import available_strategies

__version__ = "0.1.0"
__all__ = ["select", "available_strategies", "ActivelabError", "ConfigError", "DatasetNotFoundError"]
