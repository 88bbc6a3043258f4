"""Shared fixtures: a tiny convolutional model with taps, and tiny in-memory pools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from activelab.data.arrays import ArrayDataset

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Two conv taps, a hidden linear tap, dropout, and a classifier: every strategy can run on it."""

    default_taps = ["conv1", "conv2", "fc1"]
    classifier_name = "fc2"

    def __init__(self, in_channels: int = 1, num_classes: int = 4, size: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc1 = nn.Linear(6 * (size // 2) ** 2, 12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = self.drop(x.flatten(1))
        x = torch.relu(self.fc1(x))
        return self.fc2(self.drop(x))


def randomise_batchnorm(*layers: nn.modules.batchnorm._BatchNorm) -> None:
    """Non-trivial running statistics and affine parameters, so that eval-mode BatchNorm is not an identity."""
    with torch.no_grad():
        for bn in layers:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)


class AuxHeadNet(nn.Module):
    """An auxiliary head that runs in forward but does not reach the logits (its input is detached)."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.aux = nn.Linear(3, 2)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        self.aux_out = self.aux(h.detach())
        return self.fc(h)


class TiedNet(nn.Module):
    """Two Linear layers sharing one weight (tied weights): a hook on either alone misses half the gradient."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.mean(dim=(1, 2))[:, :6]  # (B, 6) from (B, 1, 8, 8)
        return self.fc(torch.tanh(self.b(torch.tanh(self.a(h)))))


class SeqFirstNet(nn.Module):
    """A Linear applied to a sequence-first (T, B, d) tensor: its output's first dimension is not the batch."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x[:, 0].permute(1, 0, 2)  # (T=8 rows, B, d=8 columns)
        return self.fc(torch.tanh(self.mix(seq)).mean(dim=0))


AWKWARD_MODELS = {"aux_head": AuxHeadNet, "tied": TiedNet, "seq_first": SeqFirstNet}


def make_pool(n: int = 60, num_classes: int = 4, size: int = 8, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    # make classes separable-ish so trained models are not degenerate
    x[:, :, 0, :] = (y.view(-1, 1, 1) * 60).to(torch.uint8)
    return ArrayDataset(x, y, mean=[0.5], std=[0.25])


@pytest.fixture
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny_pool() -> ArrayDataset:
    return make_pool()


@pytest.fixture
def tiny_validation() -> ArrayDataset:
    return make_pool(n=24, seed=1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def run_strategy(strategy, model, pool, labeled, budget, rng, validation=None, batch_size=512, info=None, **kw):
    """One selection through the engine with an explicit generator (torch seeded with 0); the round's notes
    are copied into ``info`` when given."""
    from activelab.query.engine import RoundSeed, run_query

    result = run_query(
        strategy, model, pool, np.asarray(labeled, dtype=np.int64), budget, RoundSeed(rng, 0),
        validation=validation, batch_size=batch_size, **kw,
    )  # fmt: skip
    if info is not None:
        info.update(result.info)
    return result.indices


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray head on 127.0.0.1 with 2 CPUs, started (and stopped) by this test process, shared by the Ray tests;
    yields its address. Ray resolves 127.0.0.1 to the machine's address unless told that this is a one-machine
    cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import: set in the environment for subprocesses and
    on the imported constants here)."""
    import os

    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'activelab[ray]')")
    from ray._private import ray_constants

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    was_cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    ctx = ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    address = ctx.address_info["gcs_address"]
    assert address.startswith("127.0.0.1:"), address
    try:
        yield address
    finally:
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = was_cluster
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def noisy_margin_problem(seed: int, n: int, c: int, n_labeled: int):
    """(probs, labeled mask, labels (-1 where unlabeled), truth) of a random pool whose true label is the argmax
    80% of the time and uniform otherwise: the shared test problem of the oracle strategies."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = np.where(rng.random(n) < 0.8, probs.argmax(1), rng.integers(0, c, n))
    labeled = np.zeros(n, bool)
    labeled[rng.choice(n, n_labeled, replace=False)] = True
    return probs, labeled, np.where(labeled, truth, -1), truth
