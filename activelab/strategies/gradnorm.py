"""Entropy-gradient-norm querying: AL-GradNorm (CE-only training); :mod:`.lplgrad` is the same query after
loss-prediction training.

The score of a candidate is the norm of dH(x)/dtheta (H = predictive entropy, model in eval mode, no
augmentation) on a seeded random subset of the unlabeled pool; the highest scores are labeled.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ScoreStrategy, StrategyParams, register


class GradNormParams(StrategyParams):
    subset: int | None = Field(
        10000, ge=1, description="random unlabeled candidates scored (None: all); 10,000 on CIFAR-10"
    )
    norm: Literal["per_tensor_sum", "global", "last_layer"] = Field(
        "per_tensor_sum",
        description="sum of per-tensor L2 norms (the paper), one global L2 norm, or the classifier only",
    )
    chunk_size: int | None = Field(None, ge=1, description="samples per batched pass (None: from 256 MiB)")


class GradNormBase(ScoreStrategy):
    """The entropy-gradient-norm query shared by ``gradnorm`` and ``lplgrad`` (they differ in training only)."""

    Params = GradNormParams
    first_round_random = True  # with no labels, an untrained model's entropy gradients are not informative
    example_params = {"subset": 40, "chunk_size": 16}

    def scores(self, ctx, rng):
        return ctx.entropy_gradient_norms(self.params.norm, self.params.chunk_size)


@register
class GradNorm(GradNormBase):
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
