"""LL4AL: label the samples with the highest loss predicted by a jointly trained loss-prediction module."""

from __future__ import annotations

from pydantic import Field

from .base import ScoreStrategy, StrategyParams, register


class LL4ALParams(StrategyParams):
    subset: int | None = Field(10000, ge=1, description="random unlabeled candidates scored (None: all)")


@register
class LL4AL(ScoreStrategy):
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

    def scores(self, ctx, rng):
        return ctx.predicted_losses()
