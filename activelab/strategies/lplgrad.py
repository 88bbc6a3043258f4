"""LPLgrad: the entropy-gradient-norm query on a model trained jointly with a loss-prediction module."""

from __future__ import annotations

from .base import register
from .gradnorm import GradNormBase


@register
class LPLGrad(GradNormBase):
    """LPLgrad ("Loss Prediction Loss with Gradient Norm", 2024): the GradNorm query on a model trained
    jointly with a loss-prediction module (CE + λ·ranking loss; see :mod:`activelab.train.loss_prediction`).

    The loss-prediction module is a training signal only: the query never reads it, and its parameters are
    not part of theta. Complexity as ``gradnorm``.
    Deviations from the authors' code: batched scores (the same as per-sample ones); the module's learning
    rate follows the backbone's schedule (the reference never stepped it).
    """

    name = "lplgrad"
    training = "loss_prediction"
