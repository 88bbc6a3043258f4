"""FisherMask (Gul et al. 2024): BAIT batch selection on Fisher embeddings of a FISH mask of the parameters."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..memory import check_selection_memory
from .bait import BaitParams, bait_select, gram_sum, pool_fisher
from .base import Strategy, register


@register
class FisherMaskStrategy(Strategy):
    """FisherMask (Gul et al. 2024: FISH-mask parameter selection of Sung et al. 2021 + BAIT batch selection).

    Each query: (1) the diagonal Fisher F_j = sum_{x in S} sum_c p(c|x) (d log p(c|x)/d theta_j)^2 on a seeded
    random sample S of ``fisher_samples`` pool samples (labeled and unlabeled; no labels read); (2) the mask: the
    whole classifier weight plus the top Fisher entries of every other tensor, K = floor(pct P) in all, chosen
    by index (if K <= |W_last| the mask is only the classifier weight); (3) Fisher embeddings on the mask,
    row c = sqrt(p_c) d log p_c / d theta_mask (``weighting="none"`` drops sqrt(p_c) as the authors' code did);
    (4) BAIT selection on them (:func:`bait_select`), F_U over the pool and I_L over the labeled set.

    Complexity: per-sample, per-class gradients for |S| + N + n_L samples (the diagonal Fisher by vmapped
    Jacobians; the embeddings by C batched backward passes per chunk to the masked layers' outputs);
    O((N + n_L) C K^2) for the Fisher matrices and the initial products, then
    O(b (N C^2 K + K^2 C)) for the greedy; memory O(N C K + K^2 + chunk C P), N = min(unlabeled, subset).
    Deviations from the authors' code: S is a seeded random sample (theirs was the first 1,024 of a class-sorted
    pool, i.e. two classes); the mask is chosen by index (they matched values, misaligned on ties); rows are
    sqrt(p)-weighted by default; the mask is recomputed at every query; the first query uses the same model as
    every other strategy (theirs queried from an untrained network); F_U's unlabeled part is estimated on the
    ``subset`` when the unlabeled pool is larger.
    """

    name = "fishermask"
    first_round_random = False

    class Params(BaitParams):
        pct: float = Field(0.002, gt=0, le=1, description="mask size K = floor(pct * number of parameters)")
        fisher_samples: int = Field(1024, ge=1, description="pool samples of the diagonal Fisher (seeded)")
        weighting: Literal["sqrt_p", "none"] = Field(
            "sqrt_p",
            description="sqrt(p_c)-weighted rows (BAIT), or unweighted (the FisherMask authors' code)",
        )
        chunk_size: int | None = Field(
            None, ge=1, description="samples per batched Jacobian (None: from a 256 MiB budget)"
        )

    example_params = {"subset": 40, "fisher_samples": 32, "pct": 0.05}

    def subsample_size(self, budget: int) -> int | None:
        """``subset`` candidates, but never fewer than 2 x ``budget`` (room for the oversampled forward pass)."""
        return None if self.params.subset is None else max(self.params.subset, 2 * budget)

    def query(self, ctx, budget, rng):
        p: FisherMaskStrategy.Params = self.params
        everything = np.concatenate([ctx.root_candidates, ctx.labeled])
        sample = np.sort(rng.choice(everything, size=min(p.fisher_samples, len(everything)), replace=False))
        if budget == len(ctx.candidates):
            return np.arange(budget, dtype=np.int64)
        _, n_classes = ctx.fisher_classifier_weight()  # a clear error (before the Fisher) if there is no weight
        dtype = np.float32 if p.precision == "float32" else np.float64
        # the embeddings arrive as float32 and are converted: both copies are alive for a moment
        itemsize = np.dtype(dtype).itemsize + (4 if dtype is np.float64 else 0)
        check_selection_memory("fishermask", len(ctx.candidates), n_classes, ctx.planned_mask_size(p.pct), itemsize)
        mask = ctx.fisher_mask(sample, p.pct, p.chunk_size)
        v = ctx.masked_fisher_embeddings(mask, p.weighting, p.chunk_size).astype(dtype, copy=False)
        labeled_sum = ctx.masked_fisher_gram(mask, p.weighting, p.chunk_size)
        f_u, i_l = pool_fisher(gram_sum(v), len(ctx.candidates), ctx.n_unlabeled, labeled_sum, len(ctx.labeled))
        ctx.info["fishermask_mask_size"] = mask.size
        ctx.info["fishermask_last_layer_only"] = mask.last_layer_only
        ctx.info["fishermask_mask_counts"] = mask.counts()
        return bait_select(v, f_u, i_l, len(ctx.labeled), budget, p.lam, p.prune)
