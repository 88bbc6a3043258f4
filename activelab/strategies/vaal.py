"""VAAL: variational adversarial active learning (Sinha, Ebrahimi, Darrell, ICCV 2019), a baseline of FK."""

from __future__ import annotations

from pydantic import Field

from .base import ScoreStrategy, StrategyParams, register


class VAALParams(StrategyParams):
    iterations: int = Field(2000, ge=1, description="adversarial training iterations per query (VAAL: 20000)")
    batch_size: int = Field(64, ge=1, description="labeled and unlabeled images per step (each)")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate of the VAE and the discriminator")
    beta: float = Field(1.0, ge=0, description="weight of the KL term")
    adversary_weight: float = Field(1.0, ge=0, description="lambda of the VAE's adversarial loss")
    latent_dim: int = Field(32, ge=1)
    width: int = Field(32, ge=1, description="channels of the VAE's first conv (doubling per stride-2 block)")
    hidden: int = Field(512, ge=1, description="width of the discriminator's two hidden layers")
    vae_steps: int = Field(2, ge=1)
    adversary_steps: int = Field(2, ge=1)


@register
class VAAL(ScoreStrategy):
    """VAAL (Sinha et al., ICCV 2019): a VAE and a discriminator on its latent mean are trained
    adversarially on labeled vs unlabeled images, afresh and seeded at every query; the unlabeled samples
    the discriminator finds least likely to be labeled are picked. The task model is not used.

    Complexity: ``iterations`` x (vae_steps + adversary_steps) x 2 mini-batches of VAE passes, then one
    encoder + discriminator pass over the N candidates; memory O(N) plus the two small networks.

    Deviations from the authors' code (and the FK authors' copy of it): the task model is trained by the
    experiment runner, not inside VAAL's loop; the discriminator outputs a logit (BCE with logits, same loss);
    iterations default to 2000 rather than 20000 to fit a CPU; the first round (no labels) is random, as
    VAAL starts from a random initial set (``first_round_random``).
    """

    name = "vaal"
    Params = VAALParams
    first_round_random = True
    example_params = {"iterations": 2, "batch_size": 8, "width": 8, "hidden": 16}

    def scores(self, ctx, rng):
        prob, notes = ctx.vaal_labeled_probability(rng, **self.params.model_dump())
        ctx.info.update(notes)
        return -prob
