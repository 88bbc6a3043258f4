"""Entropy-gradient-norm querying: AL-GradNorm (CE-only training) and LPLgrad (loss-prediction training).

Both score a seeded random subset of the unlabeled pool by the norm of dH(x)/dtheta (H = predictive entropy,
model in eval mode, no augmentation) and label the highest scores. They differ only in how the model was
trained, which the strategy declares through ``training``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..inference.gradients import entropy_gradient_norms
from .base import Strategy, StrategyParams, candidate_subset, register, top_scores


class GradNormParams(StrategyParams):
    subset: int | None = Field(
        10000, ge=1, description="random unlabeled candidates scored (None: all); 10,000 on CIFAR-10"
    )
    norm: Literal["per_tensor_sum", "global", "last_layer"] = Field(
        "per_tensor_sum",
        description="sum of per-tensor L2 norms (the paper), one global L2 norm, or the classifier only",
    )
    chunk_size: int | None = Field(None, ge=1, description="samples per batched pass (None: from 256 MiB)")


class _GradNormBase(Strategy):
    Params = GradNormParams
    first_round_random = True  # with no labels, an untrained model's entropy gradients are not informative
    example_params = {"subset": 40, "chunk_size": 16}

    def query(self, ctx, budget, rng):
        p = self.params
        positions = candidate_subset(len(ctx.candidates), p.subset, budget, rng)
        scores = ctx.cached(
            ("entropy_grad_norm", p.norm, p.subset, positions.tobytes()),
            lambda: entropy_gradient_norms(
                ctx.model,
                ctx.pool,
                ctx.candidates[positions],
                norm=p.norm,
                chunk_size=p.chunk_size,
                classifier=ctx.classifier,
            ),
        )
        return positions[top_scores(scores, budget, rng)]


@register
class GradNorm(_GradNormBase):
    """AL-GradNorm (Wang et al., "Boosting Active Learning via Improving Test Performance", AAAI 2022),
    entropy variant: label the candidates whose predictive entropy has the largest gradient norm with
    respect to the weights.

    Training: standard cross-entropy. Score: sum over the backbone's parameter tensors of ||dH/dtheta_t||_2
    (``norm`` selects the global norm or the classifier only). Candidates: a seeded random ``subset``.
    Complexity: one forward and one backward pass per chunk of scored candidates (layer signals; per-layer
    per-sample norms formed from each layer's input and output gradient, see
    :mod:`activelab.inference.gradients`); memory O(chunk x activations) plus O(subset).
    Deviation from the authors' code: the scores are computed batched instead of one sample at a time; they
    are the same (tested against the loop).
    """

    name = "gradnorm"
    training = "standard"


@register
class LPLGrad(_GradNormBase):
    """LPLgrad ("Loss Prediction Loss with Gradient Norm", 2024): the GradNorm query on a model trained
    jointly with a loss-prediction module (CE + λ·ranking loss; see :mod:`activelab.train.loss_prediction`).

    The loss-prediction module is a training signal only: the query never reads it, and its parameters are
    not part of theta. Complexity as ``gradnorm``.
    Deviations from the authors' code: batched scores (the same as per-sample ones); the module's learning
    rate follows the backbone's schedule (the reference never stepped it).
    """

    name = "lplgrad"
    training = "loss_prediction"
