"""QueryContext: the one door between a strategy and the model, the data and the oracle.

A strategy never touches the model or the datasets. It asks the context for arrays: forward outputs
(logits, probabilities, embeddings), MC-dropout statistics, FK descriptors, gradient norms, Fisher embeddings,
predicted losses, VAAL scores, and, for strategies that learn labels inside one selection, the in-round
oracle. Each of these is a typed method with its cache key inside, computed batched on the model's device.

Forward outputs are computed once per round for whatever the strategy chain declared it reads
(``Strategy.outputs``): one pass over the candidates yields logits and, when declared, the classifier's input.
A child context restricted to a subset of the candidates (:meth:`QueryContext.restrict`, used by the wrappers)
shares its parent's cache: rows the parent already computed are sliced, never recomputed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import dataset_labels
from ..errors import ActivelabError
from ..inference.device import seeded_torch
from ..models.introspection import classifier_name, model_device, named_module, tap_names

Subset = Literal["candidates", "labeled", "validation"]
Oracle = Callable[[np.ndarray], Sequence[int]]


def _key(indices: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


@dataclass
class _Rows:
    """Forward outputs for a set of samples of one dataset, found again by sample index."""

    indices: np.ndarray
    logits: np.ndarray
    embeddings: np.ndarray | None
    order: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.order = np.argsort(self.indices, kind="stable")

    def rows_of(self, indices: np.ndarray) -> np.ndarray | None:
        """Row numbers of ``indices`` in this block, or None if some index is not in it."""
        if len(indices) == 0:
            return np.zeros(0, dtype=np.int64)
        if len(self.indices) == 0:
            return None
        sorted_idx = self.indices[self.order]
        pos = np.searchsorted(sorted_idx, indices)
        pos = np.minimum(pos, len(sorted_idx) - 1)
        if not np.array_equal(sorted_idx[pos], indices):
            return None
        return self.order[pos]


@dataclass
class _Shared:
    """What a context and its children share: the caches, the oracle's ledger, the scores and the notes."""

    outputs: frozenset[str]
    rows: dict[str, list[_Rows]] = field(default_factory=lambda: {"pool": [], "validation": []})
    values: dict[Any, Any] = field(default_factory=dict)
    oracle: Oracle | None = None
    asked: list[np.ndarray] = field(default_factory=list)  # pool indices whose labels were revealed, per call
    scores: dict[int, float] = field(default_factory=dict)  # pool index -> score
    info: dict = field(default_factory=dict)
    forward_passes: int = 0


class QueryContext:
    """The inputs of one selection: the model (or ensemble), the pool, the candidates, the labeled set, an
    optional validation set and an optional oracle.

    - ``candidates``: pool indices that may be selected (the unlabeled pool, or a subset of it in a child).
    - ``labeled``: pool indices already labeled (their labels may be read: :meth:`labeled_labels`).
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
        outputs: Sequence[str] = ("probs",),
        oracle: Oracle | None = None,
        user_embeddings: np.ndarray | None = None,
        _shared: _Shared | None = None,
        _root_candidates: np.ndarray | None = None,
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
        self._user_embeddings = user_embeddings
        if _shared is None:
            _shared = _Shared(frozenset(outputs), oracle=oracle)
            if info is not None:
                _shared.info = info
        self._shared = _shared
        #: Separately trained models of an ensemble (the first is ``model``), when the runner keeps them.
        self.ensemble_models = list(ensemble_models) if ensemble_models else None
        #: The unlabeled pool of the whole selection (a child's ``candidates`` is a subset of it).
        self.root_candidates = self.candidates if _root_candidates is None else _root_candidates

    # -- structure ---------------------------------------------------------------------------------------
    def restrict(self, positions: np.ndarray) -> QueryContext:
        """A child context whose candidates are ``self.candidates[positions]``; it shares this context's
        caches, oracle ledger, scores and notes (positions a child returns are positions into its own
        candidates)."""
        positions = np.asarray(positions, dtype=np.int64)
        return QueryContext(
            self.model,
            self.pool,
            self.candidates[positions],
            self.labeled,
            self.validation,
            batch_size=self.batch_size,
            taps=self._taps,
            classifier=self._classifier,
            allow_pool_labels=self._allow_pool_labels,
            strategy_name=self.strategy_name,
            ensemble_models=self.ensemble_models,
            user_embeddings=self._user_embeddings,
            _shared=self._shared,
            _root_candidates=self.root_candidates,
        )

    @property
    def info(self) -> dict:
        """Free-form JSON-able notes a strategy leaves for the round's record (e.g. "fell back to random")."""
        return self._shared.info

    @property
    def forward_passes(self) -> int:
        """Plain forward passes (one per subset and output kind) made so far by this context and its family."""
        return self._shared.forward_passes

    @property
    def pool_size(self) -> int:
        return len(self.pool)

    @property
    def n_unlabeled(self) -> int:
        """Unlabeled samples of the whole pool (not only of this context's candidates)."""
        return len(self.root_candidates)

    # -- model internals ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def classifier(self) -> str:
        return classifier_name(self.model, self._classifier)

    def taps(self, override: Sequence[str] | None = None) -> list[str]:
        return tap_names(self.model, override if override is not None else self._taps, self.strategy_name)

    def classifier_parameters(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(W (C, d), b (C,) or None) of the final linear layer, as float64 numpy arrays."""
        layer = named_module(self.model, self.classifier)
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ActivelabError(
                f"{self.strategy_name} needs a linear classifier; {self.classifier!r} has no 2-D weight"
            )
        bias = getattr(layer, "bias", None)
        w = weight.detach().cpu().double().numpy()
        return w, None if bias is None else bias.detach().cpu().double().numpy()

    @property
    def num_classes(self) -> int:
        layer = named_module(self.model, self.classifier)
        out = getattr(layer, "out_features", None)
        return int(out) if out is not None else int(self.logits("candidates").shape[1])

    # -- data ----------------------------------------------------------------------------------------------
    def _dataset(self, subset: Subset) -> tuple[str, Dataset, np.ndarray]:
        if subset == "candidates":
            return "pool", self.pool, self.candidates
        if subset == "labeled":
            return "pool", self.pool, self.labeled
        if subset == "validation":
            if self.validation is None:
                raise ActivelabError(f"{self.strategy_name} needs a validation set: pass validation=...")
            return "validation", self.validation, np.arange(len(self.validation), dtype=np.int64)
        raise ValueError(f"unknown subset {subset!r}")

    def dataset(self, subset: Subset) -> tuple[Dataset, np.ndarray]:
        """(dataset, indices) of ``subset``: an escape hatch for strategies of one's own that need raw samples.
        Built-in strategies use the typed methods, whose results are cached and shared."""
        _, dataset, idx = self._dataset(subset)
        return dataset, idx

    def _labels_of(self, which: str) -> np.ndarray:
        def read():
            return dataset_labels(self.pool if which == "pool" else self.validation)

        return self._cached(("labels", which), read)

    def validation_labels(self) -> np.ndarray:
        self._dataset("validation")  # a clear error without a validation set
        return self._labels_of("validation")

    def labeled_labels(self) -> np.ndarray:
        """Labels of the labeled set (known by definition: the pool's y of a labeled sample must be a class)."""
        labels = self._labels_of("pool")[self.labeled]
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ActivelabError(
                f"{self.strategy_name} reads the labels of the labeled samples, but the pool gives them "
                f"{labels.min()}..{labels.max()}, outside the classes [0, {self.num_classes}): put the known labels "
                "of labeled samples in the pool's y (-1 is fine for unlabeled ones)"
            )
        return labels

    @staticmethod
    def _pool_subset(subset: str) -> None:
        if subset not in ("candidates", "labeled"):
            raise ActivelabError(f"subset must be 'candidates' or 'labeled' here; got {subset!r}")

    def pool_labels(self, subset: Literal["candidates", "labeled"] = "candidates") -> np.ndarray:
        """True labels of pool samples: only for oracle ablations (``reads_pool_labels``)."""
        self._pool_subset(subset)
        if subset == "labeled":
            return self.labeled_labels()
        if not self._allow_pool_labels:
            raise ActivelabError(f"{self.strategy_name} may not read the labels of the unlabeled pool")
        return self._labels_of("pool")[self.candidates]

    def user_embeddings(self, subset: Literal["candidates", "labeled"] = "candidates") -> np.ndarray | None:
        """Rows of the embedding array the caller passed for the whole pool (``select(..., embeddings=...)``),
        or None when none was passed."""
        self._pool_subset(subset)
        if self._user_embeddings is None:
            return None
        return self._user_embeddings[self.candidates if subset == "candidates" else self.labeled]

    # -- the in-round oracle ---------------------------------------------------------------------------------
    @property
    def has_oracle(self) -> bool:
        return self._shared.oracle is not None

    def ask(self, positions: np.ndarray) -> np.ndarray:
        """Labels of the candidates at ``positions``, from the oracle, inside the selection. Every asked sample
        is spent from the budget: the strategy must return it among its picks. Nothing else is revealed."""
        if self._shared.oracle is None:
            raise ActivelabError(
                f"{self.strategy_name} asks for labels of its own picks during the selection: pass an oracle "
                "(select(..., oracle=fn) with fn(pool_indices) -> labels); experiments provide one"
            )
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return np.zeros(0, dtype=np.int64)
        idx = self.candidates[positions]
        labels = np.asarray(self._shared.oracle(idx.copy()), dtype=np.int64)
        if labels.shape != idx.shape:
            raise ActivelabError(f"the oracle returned {labels.shape} labels for {len(idx)} asked samples")
        self._shared.asked.append(idx)
        return labels

    def asked(self) -> np.ndarray:
        """Pool indices asked so far, in order."""
        return np.concatenate(self._shared.asked) if self._shared.asked else np.zeros(0, dtype=np.int64)

    @property
    def oracle_calls(self) -> int:
        return len(self._shared.asked)

    # -- scores ------------------------------------------------------------------------------------------------
    def set_scores(self, scores: np.ndarray) -> None:
        """Record per-candidate scores (aligned with ``candidates``); ``select(..., return_scores=True)`` returns
        them by pool index."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != self.candidates.shape:
            raise ActivelabError(f"scores have shape {scores.shape} for {len(self.candidates)} candidates")
        self._shared.scores.update(zip(self.candidates.tolist(), scores.tolist(), strict=True))

    def scores_by_pool_index(self) -> np.ndarray | None:
        if not self._shared.scores:
            return None
        out = np.full(self.pool_size, np.nan)
        idx = np.fromiter(self._shared.scores.keys(), dtype=np.int64, count=len(self._shared.scores))
        out[idx] = np.fromiter(self._shared.scores.values(), dtype=np.float64, count=len(idx))
        return out

    # -- cached model outputs ----------------------------------------------------------------------------------
    def _cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        values = self._shared.values
        if key not in values:
            values[key] = compute()
        return values[key]

    def _rows(self, subset: Subset, embeddings: bool) -> tuple[np.ndarray, np.ndarray | None]:
        which, dataset, idx = self._dataset(subset)
        if len(idx) == 0 and subset != "candidates" and len(self.candidates):
            # nothing to pass: zero rows of the candidates' (which the round needs anyway), of the right width
            logits, emb = self._rows("candidates", embeddings)
            return logits[:0], None if emb is None else emb[:0]
        for block in self._shared.rows[which]:
            if embeddings and block.embeddings is None:
                continue
            rows = block.rows_of(idx)
            if rows is not None:
                return block.logits[rows], None if block.embeddings is None else block.embeddings[rows]
        from ..inference.forward import forward_pass

        want = embeddings or "embeddings" in self._shared.outputs
        out = forward_pass(self.model, dataset, idx, self.batch_size, want, self._classifier)
        self._shared.forward_passes += 1
        self._shared.rows[which].append(_Rows(idx.copy(), out.logits, out.embeddings))
        return out.logits, out.embeddings

    def logits(self, subset: Subset = "candidates") -> np.ndarray:
        return self._rows(subset, embeddings=False)[0]

    def probs(self, subset: Subset = "candidates") -> np.ndarray:
        """Softmax probabilities (N, C) float64."""
        which, _, idx = self._dataset(subset)
        from ..inference.forward import softmax

        return self._cached(("probs", which, _key(idx)), lambda: softmax(self.logits(subset).astype(np.float64)))

    def embeddings(self, subset: Subset = "candidates") -> np.ndarray:
        """The classifier's input (penultimate features), (N, d) float32."""
        return self._rows(subset, embeddings=True)[1]

    # -- MC dropout / ensembles ----------------------------------------------------------------------------------
    def _mc_models(self, ensemble: int) -> list[nn.Module]:
        members = self.ensemble_models
        if members:
            if len(members) != ensemble:
                raise ActivelabError(
                    f"{self.strategy_name}: ensemble={ensemble} but the runner gave {len(members)} ensemble models"
                )
            return list(members)
        return [self.model] * ensemble

    def mc_statistics(self, mc_samples: int, ensemble: int, seed: int):
        """Streamed sufficient statistics (:class:`~activelab.inference.mc.MCStatistics`) of ``mc_samples``
        MC-dropout passes per ensemble member over the candidates. Without ensemble members from the runner,
        ``ensemble`` > 1 means that many independently seeded families of passes of the one model."""
        from ..inference.mc import mc_statistics

        def compute():
            models = self._mc_models(ensemble)
            return mc_statistics(models, self.pool, self.candidates, mc_samples, seed, self.batch_size)

        return self._cached(("mc_statistics", mc_samples, ensemble, seed, _key(self.candidates)), compute)

    def mc_probs(self, mc_samples: int, seed: int, ensemble: int = 1) -> np.ndarray:
        """The stochastic predictions themselves, (E·K, N, C) float32, the same passes as :meth:`mc_statistics`."""
        from ..inference.mc import mc_probabilities

        def compute():
            models = self._mc_models(ensemble)
            return mc_probabilities(models, self.pool, self.candidates, mc_samples, seed, self.batch_size)

        return self._cached(("mc_probs", mc_samples, ensemble, seed, _key(self.candidates)), compute)

    # -- FK descriptors ---------------------------------------------------------------------------------------
    def descriptors(self, subset: Subset, taps: Sequence[str], labels: Mapping[str, Any], key: tuple = ()):
        """Pooled tapped activations z and Fisher scores g (:func:`~activelab.inference.descriptors.
        compute_descriptors`) of ``subset``; ``labels`` maps label-set names to "argmax", an array or a
        function of a batch's state. ``key`` identifies ``labels`` in the cache (callables have no value)."""
        from ..inference.descriptors import compute_descriptors

        which, dataset, idx = self._dataset(subset)

        def compute():
            return compute_descriptors(self.model, dataset, idx, list(taps), dict(labels), self.batch_size)

        return self._cached(("descriptors", which, _key(idx), tuple(taps), key), compute)

    def perturbed_class_scores(
        self,
        subset: Subset,
        taps: Sequence[str],
        kind: str,
        copies: int,
        seed: int,
        rotation_degrees: float,
        noise_std: float,
        ridge: float,
    ) -> np.ndarray:
        """Per-class scores (N, C) of FK's perturbation estimators over ``copies`` perturbed copies."""
        from ..inference.descriptors import perturbed_class_scores

        _, dataset, idx = self._dataset(subset)
        gen = torch.Generator().manual_seed(int(seed))
        return perturbed_class_scores(
            self.model, dataset, idx, list(taps), kind, copies, gen, rotation_degrees, noise_std, ridge,
            batch_size=min(self.batch_size, 64),
        )  # fmt: skip

    # -- gradients ----------------------------------------------------------------------------------------------
    def entropy_gradient_norms(self, norm: str = "per_tensor_sum", chunk_size: int | None = None) -> np.ndarray:
        """Per-candidate norms of the predictive entropy's gradient with respect to the model's backbone weights."""
        from ..inference.gradients import entropy_gradient_norms

        def compute():
            return entropy_gradient_norms(
                self.model, self.pool, self.candidates, norm=norm, chunk_size=chunk_size, classifier=self.classifier
            )

        return self._cached(("entropy_grad_norm", norm, _key(self.candidates)), compute)

    # -- loss prediction ----------------------------------------------------------------------------------------
    def predicted_losses(self) -> np.ndarray:
        """The loss-prediction module's output for every candidate (the model must have been trained with one)."""
        from ..train.loss_prediction import loss_module, predicted_losses

        loss_module(self.model)  # a clear error before any work if the model was not trained for this
        return self._cached(
            ("predicted_loss", _key(self.candidates)),
            lambda: predicted_losses(self.model, self.pool, self.candidates, self.batch_size),
        )

    # -- Fisher information ---------------------------------------------------------------------------------------
    def fisher_classifier_weight(self) -> tuple[str, int]:
        """(name of the classifier's weight tensor, number of classes); a clear error if there is no weight."""
        from ..inference.fisher import num_classes_of

        weight = f"{self.classifier}.weight"
        return weight, num_classes_of(self.model, weight)

    def planned_mask_size(self, pct: float) -> int:
        from ..inference.fisher import planned_mask_size

        return planned_mask_size(self.model, self.fisher_classifier_weight()[0], pct)

    def fisher_mask(self, sample: np.ndarray, pct: float, chunk_size: int | None = None):
        """The FISH mask (:class:`~activelab.inference.fisher.FisherMask`) of the diagonal Fisher estimated on the
        pool samples ``sample``: the classifier's weight plus the top entries of every other tensor."""
        from ..inference.fisher import diagonal_fisher, fisher_mask

        def compute():
            fisher = diagonal_fisher(self.model, self.pool, np.asarray(sample, dtype=np.int64), chunk_size)
            return fisher_mask(fisher, self.fisher_classifier_weight()[0], pct)

        return self._cached(("fisher_mask", _key(np.asarray(sample)), pct), compute)

    def masked_fisher_embeddings(self, mask, weighting: str, chunk_size: int | None = None) -> np.ndarray:
        """Fisher embeddings (N, C, K) of the candidates on ``mask``."""
        from ..inference.fisher import masked_fisher_embeddings

        return masked_fisher_embeddings(self.model, self.pool, self.candidates, mask, weighting, chunk_size)

    def masked_fisher_gram(self, mask, weighting: str, chunk_size: int | None = None) -> np.ndarray:
        """sum over the labeled set of V_x^T V_x (K, K) on ``mask``, without keeping the embeddings."""
        from ..inference.fisher import masked_fisher_gram

        if len(self.labeled) == 0:
            return np.zeros((mask.size, mask.size))
        return masked_fisher_gram(self.model, self.pool, self.labeled, mask, weighting, chunk_size)

    def last_layer_fisher_embeddings(
        self, subset: Literal["candidates", "labeled"], rows: slice | np.ndarray, include_bias: bool, dtype
    ) -> np.ndarray:
        """Closed-form Fisher embeddings of the classifier's weight (N, C, C d [+ C]) for ``rows`` of ``subset``,
        from the cached probabilities and embeddings (no extra model pass)."""
        from ..inference.fisher import last_layer_fisher_embeddings

        probs, feats = self.probs(subset), self.embeddings(subset)
        return last_layer_fisher_embeddings(probs[rows], feats[rows], include_bias=include_bias, dtype=dtype)

    # -- VAAL --------------------------------------------------------------------------------------------------------
    def vaal_labeled_probability(self, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
        """Train VAAL's VAE and discriminator (afresh, seeded from ``rng``) on labeled vs unlabeled samples and
        return the discriminator's probability that each candidate is labeled, with training notes."""
        from ..train.vaal import VAE, Discriminator, labeled_probability, train_vaal

        x0 = self.pool[int(self.candidates[0])][0]
        device = self.device
        devices = [device] if device.type == "cuda" else []
        with seeded_torch(int(rng.integers(2**31 - 1)), devices):
            vae = VAE(x0.shape[0], x0.shape[-1], params["latent_dim"], params["width"]).to(device)
            disc = Discriminator(params["latent_dim"], params["hidden"]).to(device)
            stats = train_vaal(
                vae, disc, self.pool, self.labeled, self.candidates, rng,
                iterations=params["iterations"], batch_size=params["batch_size"], lr=params["lr"],
                beta=params["beta"], adversary_weight=params["adversary_weight"], vae_steps=params["vae_steps"],
                adversary_steps=params["adversary_steps"], device=device,
            )  # fmt: skip
        prob = labeled_probability(vae, disc, self.pool, self.candidates, self.batch_size)
        notes = {
            "vaal_seconds": round(stats.seconds, 3),
            "vaal_final_losses": {"vae": stats.vae[-1], "discriminator": stats.discriminator[-1]},
        }
        return prob, notes
