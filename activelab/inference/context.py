"""QueryContext: everything a strategy may ask of the model and data, computed once per round and cached.

Strategies never touch the model or the dataset directly; they call methods here, which run batched passes on
the model's device and return numpy arrays. Method families (MC dropout, descriptors, per-sample gradients)
add their own cached computations with :meth:`QueryContext.cached`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import dataset_labels
from ..errors import ActivelabError
from .forward import forward_pass, softmax
from .modules import classifier_name, tap_names

Subset = Literal["candidates", "labeled", "validation"]


class QueryContext:
    """The inputs of one selection round.

    - ``candidates``: pool indices that may be selected (the unlabeled pool, or a seeded subset of it).
    - ``labeled``: pool indices already labeled.
    - ``validation``: an optional labeled dataset (weakly labeled in FK: only its labels are read).
    """

    def __init__(
        self,
        model: nn.Module,
        pool: Dataset,
        candidates: np.ndarray,
        labeled: np.ndarray,
        validation: Dataset | None = None,
        *,
        batch_size: int = 512,
        taps: Sequence[str] | None = None,
        classifier: str | None = None,
        allow_pool_labels: bool = False,
        strategy_name: str = "this strategy",
        info: dict | None = None,
        ensemble_models: Sequence[nn.Module] | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.candidates = np.asarray(candidates, dtype=np.int64)
        self.labeled = np.asarray(labeled, dtype=np.int64)
        self.validation = validation
        self.batch_size = batch_size
        self._taps = taps
        self._classifier = classifier
        self._allow_pool_labels = allow_pool_labels
        self.strategy_name = strategy_name
        self._cache: dict[Any, Any] = {}
        #: Free-form notes a strategy leaves for the round's record (e.g. "fell back to random").
        self.info: dict = info if info is not None else {}
        #: Separately trained models of an ensemble (the first is ``model``), when the runner keeps them.
        self.ensemble_models = list(ensemble_models) if ensemble_models else None

    # -- model internals -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        from .forward import model_device

        return model_device(self.model)

    @property
    def classifier(self) -> str:
        return classifier_name(self.model, self._classifier)

    def taps(self, override: Sequence[str] | None = None) -> list[str]:
        return tap_names(self.model, override if override is not None else self._taps, self.strategy_name)

    # -- data ------------------------------------------------------------------------------------------
    def dataset(self, subset: Subset) -> tuple[Dataset, np.ndarray]:
        if subset == "candidates":
            return self.pool, self.candidates
        if subset == "labeled":
            return self.pool, self.labeled
        if subset == "validation":
            if self.validation is None:
                raise ActivelabError(f"{self.strategy_name} needs a validation set: pass validation=...")
            return self.validation, np.arange(len(self.validation), dtype=np.int64)
        raise ValueError(f"unknown subset {subset!r}")

    def validation_labels(self) -> np.ndarray:
        return self.cached(("labels", "validation"), lambda: dataset_labels(self.dataset("validation")[0]))

    def pool_labels(self, subset: Literal["candidates", "labeled"] = "candidates") -> np.ndarray:
        """True labels of pool samples: only for oracle ablations (``reads_pool_labels``)."""
        if subset == "labeled":
            return dataset_labels(self.pool)[self.labeled]
        if not self._allow_pool_labels:
            raise ActivelabError(f"{self.strategy_name} may not read the labels of the unlabeled pool")
        return dataset_labels(self.pool)[self.candidates]

    # -- cached model outputs ----------------------------------------------------------------------------
    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _forward(self, subset: Subset, embeddings: bool):
        key = ("forward", subset, embeddings)
        if key not in self._cache and not embeddings and ("forward", subset, True) in self._cache:
            return self._cache[("forward", subset, True)]

        def run():
            dataset, idx = self.dataset(subset)
            return forward_pass(self.model, dataset, idx, self.batch_size, embeddings, self._classifier)

        return self.cached(key, run)

    def logits(self, subset: Subset = "candidates") -> np.ndarray:
        return self._forward(subset, embeddings=False).logits

    def probs(self, subset: Subset = "candidates") -> np.ndarray:
        return self.cached(("probs", subset), lambda: softmax(self.logits(subset).astype(np.float64)))

    def embeddings(self, subset: Subset = "candidates") -> np.ndarray:
        """The classifier's input (penultimate features), (N, d)."""
        return self._forward(subset, embeddings=True).embeddings
