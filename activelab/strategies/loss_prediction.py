"""LL4AL: label the samples with the highest loss predicted by a jointly trained loss-prediction module."""

from __future__ import annotations

from pydantic import Field

from ..train.loss_prediction import loss_module, predicted_losses
from .base import Strategy, StrategyParams, candidate_subset, register, top_scores


class LL4ALParams(StrategyParams):
    subset: int | None = Field(10000, ge=1, description="random unlabeled candidates scored (None: all)")


@register
class LL4AL(Strategy):
    """Learning Loss for Active Learning (Yoo & Kweon, CVPR 2019): top predicted loss l̂(x).

    Needs a model trained by the ``loss_prediction`` trainer (which attaches ``model.loss_module``); the
    score is the module's output on the tapped activations of an eval-mode forward pass over a seeded random
    ``subset`` of the unlabeled pool. Baseline of LPLgrad.
    Complexity: one forward pass per scored candidate; O(subset) memory.
    Deviations from the authors' code: as the trainer (module schedule stepped, tie handling).
    """

    name = "ll4al"
    training = "loss_prediction"
    first_round_random = True  # with no labels, the module has never been trained
    Params = LL4ALParams
    example_params = {"subset": 40}

    def query(self, ctx, budget, rng):
        loss_module(ctx.model)  # a clear error before any work if the model was not trained for this
        positions = candidate_subset(len(ctx.candidates), self.params.subset, budget, rng)
        scores = ctx.cached(
            ("predicted_loss", positions.tobytes()),
            lambda: predicted_losses(ctx.model, ctx.pool, ctx.candidates[positions], ctx.batch_size),
        )
        return positions[top_scores(scores, budget, rng)]
