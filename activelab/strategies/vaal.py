"""VAAL: variational adversarial active learning (Sinha, Ebrahimi, Darrell, ICCV 2019), a baseline of FK."""

from __future__ import annotations

import torch
from pydantic import Field

from ..train.vaal import VAE, Discriminator, labeled_probability, train_vaal
from .base import Strategy, StrategyParams, register, top_scores
from .random import random_positions


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
class VAAL(Strategy):
    """VAAL (Sinha et al., ICCV 2019): a VAE and a discriminator on its latent mean are trained
    adversarially on labeled vs unlabeled images, afresh and seeded at every query; the unlabeled samples
    the discriminator finds least likely to be labeled are picked. The task model is not used.

    Complexity: ``iterations`` x (vae_steps + adversary_steps) x 2 mini-batches of VAE passes, then one
    encoder + discriminator pass over the N candidates; memory O(N) plus the two small networks.

    Deviations from the authors' code (and the FK authors' copy of it): the task model is trained by the
    experiment runner, not inside VAAL's loop; the discriminator outputs a logit (BCE with logits, same loss);
    iterations default to 2000 rather than 20000 to fit a CPU; the first round (no labels) is random, as
    VAAL starts from a random initial set.
    """

    name = "vaal"
    Params = VAALParams
    first_round_random = True
    example_params = {"iterations": 2, "batch_size": 8, "width": 8, "hidden": 16}

    def query(self, ctx, budget, rng):
        p: VAALParams = self.params
        pool, candidates = ctx.dataset("candidates")
        labeled = ctx.labeled
        if len(labeled) == 0:
            ctx.info["fallback"] = "random"
            ctx.info["fallback_reason"] = "VAAL needs labeled samples"
            return random_positions(len(candidates), budget, rng)
        x0 = pool[int(candidates[0])][0]
        device = ctx.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(rng.integers(2**31 - 1)))
            vae = VAE(x0.shape[0], x0.shape[-1], p.latent_dim, p.width).to(device)
            disc = Discriminator(p.latent_dim, p.hidden).to(device)
            stats = train_vaal(
                vae, disc, pool, labeled, candidates, rng,
                iterations=p.iterations, batch_size=p.batch_size, lr=p.lr, beta=p.beta,
                adversary_weight=p.adversary_weight, vae_steps=p.vae_steps, adversary_steps=p.adversary_steps,
                device=device,
            )  # fmt: skip
        prob = labeled_probability(vae, disc, pool, candidates, ctx.batch_size)
        ctx.info["vaal_seconds"] = round(stats.seconds, 3)
        ctx.info["vaal_final_losses"] = {"vae": stats.vae[-1], "discriminator": stats.discriminator[-1]}
        return top_scores(-prob, budget, rng)
