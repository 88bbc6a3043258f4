"""VAAL's networks and their adversarial training (Sinha, Ebrahimi, Darrell: "Variational Adversarial
Active Learning", ICCV 2019).

A convolutional VAE embeds images in a latent space; a discriminator on the latent mean learns to tell
labeled from unlabeled samples while the VAE learns to fool it (and to reconstruct both). Samples the
discriminator finds least likely to be labeled are the ones to label.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import ActivelabError


class VAE(nn.Module):
    """Conv encoder (stride-2 3x3 convs + BatchNorm + ReLU down to <= 4x4) -> (mu, logvar) of size
    ``latent_dim``; the decoder mirrors it with transposed convs and resizes to the input size. The output is
    unbounded (inputs are normalised images) and the reconstruction loss is MSE."""

    def __init__(self, in_channels: int, image_size: int, latent_dim: int = 32, width: int = 32) -> None:
        super().__init__()
        self.image_size = image_size
        layers, ch, size = [], in_channels, image_size
        widths = []
        while size > 4 and len(widths) < 4:
            out = width * 2 ** len(widths)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            ch, size = out, math.ceil(size / 2)
            widths.append(out)
        if not widths:  # tiny images: one unstrided block
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            ch = width
            widths.append(width)
        self.encoder = nn.Sequential(*layers)
        self.bottom = (ch, size)
        flat = ch * size * size
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)
        self.expand = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = []
        for out in reversed(widths[:-1]):
            dec += [
                nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            ch = out
        dec += [nn.ConvTranspose2d(ch, in_channels, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        ch, size = self.bottom
        out = self.decoder(self.expand(z).view(-1, ch, size, size))
        if out.shape[-1] != self.image_size or out.shape[-2] != self.image_size:
            out = F.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


class Discriminator(nn.Module):
    """MLP on the latent mean: latent -> 512 -> 512 -> 1 logit of "labeled"."""

    def __init__(self, latent_dim: int = 32, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.ReLU(True),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Linear(hidden, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> torch.Tensor:
    """MSE reconstruction + beta x KL(q(z|x) || N(0, I)) (KL summed over latents, averaged over the batch)."""
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1).mean()
    return F.mse_loss(recon, x) + beta * kl


@dataclass
class VAALStats:
    """Losses per iteration (VAE total, reconstruction+KL part, discriminator) and the wall time."""

    vae: list[float] = field(default_factory=list)
    vae_unsup: list[float] = field(default_factory=list)
    discriminator: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _fetch(dataset: Dataset, idx: np.ndarray) -> torch.Tensor:
    if hasattr(dataset, "batch"):
        return dataset.batch(idx)[0]
    return torch.stack([dataset[int(i)][0] for i in idx])


def train_vaal(
    vae: VAE,
    discriminator: Discriminator,
    dataset: Dataset,
    labeled: np.ndarray,
    unlabeled: np.ndarray,
    rng: np.random.Generator,
    *,
    iterations: int = 2000,
    batch_size: int = 64,
    lr: float = 5e-4,
    beta: float = 1.0,
    adversary_weight: float = 1.0,
    vae_steps: int = 2,
    adversary_steps: int = 2,
    device: torch.device | str = "cpu",
) -> VAALStats:
    """Train the VAE and the discriminator adversarially on labeled vs unlabeled batches (Adam, ``lr``).

    Per iteration: ``vae_steps`` VAE updates on (reconstruction + beta·KL of both batches + adversary_weight·
    BCE pushing the discriminator to call both batches labeled), then ``adversary_steps`` discriminator
    updates (labeled -> 1, unlabeled -> 0, on the VAE's means). Batches are drawn with ``rng``; the
    reparameterisation noise comes from torch's global generator (seed it, e.g. inside ``fork_rng``).
    The learning rates decay by 0.9 every iterations/25 as in VAAL's code.
    """
    if len(labeled) == 0 or len(unlabeled) == 0:
        raise ActivelabError("VAAL needs both labeled and unlabeled samples to train its discriminator")
    vae.to(device).train()
    discriminator.to(device).train()
    opt_vae = torch.optim.Adam(vae.parameters(), lr=lr)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr)
    decay_every = max(1, iterations // 25)
    stats = VAALStats()
    start = time.perf_counter()

    def draw(pool: np.ndarray) -> torch.Tensor:
        idx = pool[rng.integers(0, len(pool), size=min(batch_size, len(pool)))]
        return _fetch(dataset, idx).to(device)

    for it in range(iterations):
        if it and it % decay_every == 0:
            for opt in (opt_vae, opt_d):
                for group in opt.param_groups:
                    group["lr"] *= 0.9
        for _ in range(vae_steps):
            xl, xu = draw(labeled), draw(unlabeled)
            recon_l, mu_l, logvar_l = vae(xl)
            recon_u, mu_u, logvar_u = vae(xu)
            unsup = vae_loss(xl, recon_l, mu_l, logvar_l, beta) + vae_loss(xu, recon_u, mu_u, logvar_u, beta)
            fool = F.binary_cross_entropy_with_logits(
                discriminator(mu_l), torch.ones(len(xl), device=device)
            ) + F.binary_cross_entropy_with_logits(discriminator(mu_u), torch.ones(len(xu), device=device))
            loss = unsup + adversary_weight * fool
            opt_vae.zero_grad()
            loss.backward()
            opt_vae.step()
        for _ in range(adversary_steps):
            xl, xu = draw(labeled), draw(unlabeled)
            with torch.no_grad():
                mu_l = vae.encode(xl)[0]
                mu_u = vae.encode(xu)[0]
            d_loss = F.binary_cross_entropy_with_logits(
                discriminator(mu_l), torch.ones(len(xl), device=device)
            ) + F.binary_cross_entropy_with_logits(discriminator(mu_u), torch.zeros(len(xu), device=device))
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
        stats.vae.append(float(loss.detach()))
        stats.vae_unsup.append(float(unsup.detach()))
        stats.discriminator.append(float(d_loss.detach()))
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def labeled_probability(
    vae: VAE, discriminator: Discriminator, dataset: Dataset, indices: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """The discriminator's probability that each sample is labeled, from the VAE's latent mean (eval mode)."""
    vae.eval()
    discriminator.eval()
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(indices), batch_size):
        x = _fetch(dataset, np.asarray(indices[start : start + batch_size])).to(device)
        out.append(torch.sigmoid(discriminator(vae.encode(x)[0])).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)
