"""VAAL: networks, falling losses on a toy problem, and a query that finds what the labeled set lacks."""

from __future__ import annotations

import numpy as np
import torch

from activelab.data.arrays import ArrayDataset
from activelab.strategies.base import get_strategy
from activelab.train.vaal import VAE, Discriminator, labeled_probability, train_vaal

from .conftest import TinyNet, run_strategy


def toy_pool(n=120, size=12, seed=0):
    """Type A: bright top half; type B: bright bottom half; plus noise. Even indices A, odd B."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n, 1, size, size), generator=g, dtype=torch.uint8)
    x[0::2, :, : size // 2] += 180
    x[1::2, :, size // 2 :] += 180
    return ArrayDataset(x, torch.arange(n) % 2, mean=[0.4], std=[0.3])


def test_vae_shapes_for_several_sizes():
    for c, s in ((1, 28), (3, 32), (1, 8), (1, 3)):
        vae = VAE(c, s, latent_dim=5)
        recon, mu, logvar = vae(torch.randn(2, c, s, s))
        assert recon.shape == (2, c, s, s) and mu.shape == (2, 5) and logvar.shape == (2, 5)
    assert Discriminator(5)(torch.randn(3, 5)).shape == (3,)


def test_losses_fall_on_a_toy_problem():
    torch.manual_seed(0)
    pool = toy_pool()
    labeled = np.arange(0, 120, 2)[:30]  # only type A is labeled
    unlabeled = np.setdiff1d(np.arange(120), labeled)
    vae, disc = VAE(1, 12, latent_dim=4, width=8), Discriminator(4, hidden=32)
    stats = train_vaal(vae, disc, pool, labeled, unlabeled, np.random.default_rng(0), iterations=150,
                       batch_size=16, lr=5e-3, adversary_weight=0.1, vae_steps=1, adversary_steps=1)  # fmt: skip
    first, last = np.mean(stats.vae_unsup[:5]), np.mean(stats.vae_unsup[-20:])
    assert last < 0.7 * first, (first, last)
    d_first, d_last = np.mean(stats.discriminator[:5]), np.mean(stats.discriminator[-20:])
    # chance is 2 ln 2 = 1.39; the best possible here is about 0.95 (unlabeled A images look labeled)
    assert d_first > 1.3 and d_last < 1.05, (d_first, d_last)
    prob = labeled_probability(vae, disc, pool, unlabeled)
    is_b = unlabeled % 2 == 1
    assert prob[is_b].mean() < 0.3 < 0.5 < prob[~is_b].mean()  # B images look unlabeled


def test_query_picks_what_the_labeled_set_lacks_and_is_seeded():
    torch.manual_seed(0)
    pool = toy_pool()
    labeled = np.arange(0, 120, 2)[:30]
    params = {
        "iterations": 100,
        "batch_size": 16,
        "lr": 5e-3,
        "adversary_weight": 0.1,
        "latent_dim": 4,
        "width": 8,
        "hidden": 32,
        "vae_steps": 1,
        "adversary_steps": 1,
    }
    picks = []
    for _ in range(2):
        strategy = get_strategy("vaal")(**params)
        info: dict = {}
        picks.append(run_strategy(strategy, TinyNet(size=12), pool, labeled, 10, np.random.default_rng(4), info=info))
    np.testing.assert_array_equal(picks[0], picks[1])
    assert np.mean(picks[0] % 2 == 1) >= 0.9  # type B
    assert set(info["vaal_final_losses"]) == {"vae", "discriminator"}


def test_first_round_without_labels_is_random():
    info: dict = {}
    strategy = get_strategy("vaal")(iterations=1)
    out = run_strategy(strategy, TinyNet(size=12), toy_pool(20), np.array([], np.int64), 4,
                       np.random.default_rng(0), info=info)  # fmt: skip
    assert info["first_round"] == "random" and len(set(out.tolist())) == 4
