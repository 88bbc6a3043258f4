"""Entropy-gradient norms: batched (torch.func) scores against a per-sample autograd loop and a closed form;
the gradnorm and lplgrad strategies."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import activelab
from activelab.errors import ActivelabError
from activelab.inference.gradients import (
    NORMS,
    entropy_gradient_norms,
    entropy_gradient_norms_loop,
)
from activelab.models import LeNet
from activelab.train import get_trainer

from .conftest import AWKWARD_MODELS, TinyNet, make_pool, randomise_batchnorm


class BNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> conv -> BatchNorm -> pool -> linear, with non-trivial running stats."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


def _bn_net() -> BNNet:
    torch.manual_seed(0)
    model = BNNet()
    randomise_batchnorm(model.bn1, model.bn2)
    with torch.no_grad():
        model.fc.weight.mul_(4)  # confident, non-uniform predictions
    return model


def _lenet() -> LeNet:
    torch.manual_seed(1)
    return LeNet(num_classes=10, in_channels=1, image_size=28, dropout=True)


def _pool(n: int, size: int, seed: int = 0):
    return make_pool(n=n, size=size, seed=seed)


class StridedNet(nn.Module):
    """Two stride-2 convolutions (8x8 -> 4x4 -> 2x2) with biases, then a linear layer mapped over the four
    positions and a classifier: the last convolution has few output positions (L = 4 < out*q/(out+q)), so
    its per-sample norm goes through Gram matrices; the mapped linear layer takes the gathered-products path.
    """

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.rows = nn.Linear(16, 6)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 16, 2, 2)
        x = torch.tanh(self.rows(x.flatten(2).transpose(1, 2)))  # (B, 4, 6)
        return self.fc(x.flatten(1))


def _strided_net() -> StridedNet:
    torch.manual_seed(2)
    model = StridedNet()
    with torch.no_grad():
        model.fc.weight.mul_(3)
    return model


class SharedNet(nn.Module):
    """A convolution called twice and a grouped one: not covered by layer signals, so the vmap fallback."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.conv(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def _shared_net() -> SharedNet:
    torch.manual_seed(3)
    return SharedNet()


@pytest.mark.parametrize("method", ["signals", "vmap"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(
    ("factory", "size"),
    [(_bn_net, 8), (_lenet, 28), (_strided_net, 8), (_shared_net, 8)],
    ids=["batchnorm", "lenet", "strided", "shared"],
)
def test_batched_equals_per_sample_loop(factory, size, norm, method):
    model = factory()
    model.train()  # the scores must use eval mode anyway (BatchNorm running stats, dropout off)
    pool = _pool(13, size)
    idx = np.arange(13)[::-1].copy()
    batched = entropy_gradient_norms(model, pool, idx, norm=norm, chunk_size=5, method=method)
    loop = entropy_gradient_norms_loop(model, pool, idx, norm=norm)
    assert batched.shape == (13,) and np.all(batched > 0)
    np.testing.assert_allclose(batched, loop, rtol=1e-4)
    assert model.training and all(m.training for m in model.modules())  # modes restored


def test_norms_differ_and_are_consistent():
    model, pool = _bn_net(), _pool(9, 8)
    idx = np.arange(9)
    per_tensor = entropy_gradient_norms(model, pool, idx, norm="per_tensor_sum")
    global_ = entropy_gradient_norms(model, pool, idx, norm="global")
    last = entropy_gradient_norms(model, pool, idx, norm="last_layer")
    # triangle inequality: the global norm never exceeds the sum of per-tensor norms; both exceed the last layer
    assert np.all(global_ <= per_tensor + 1e-12) and np.all(last <= global_ + 1e-12)
    assert np.all(global_ < per_tensor)


def test_last_layer_matches_closed_form():
    """dH/dz = -p (log p + H); dH/dW = (dH/dz) h^T, dH/db = dH/dz: norm = ||dH/dz|| sqrt(||h||^2 + 1)."""
    model, pool = _bn_net(), _pool(11, 8)
    idx = np.arange(11)
    model.eval()
    x, _ = pool.batch(idx)
    h = []
    handle = model.fc.register_forward_pre_hook(lambda _m, args: h.append(args[0]))
    with torch.no_grad():
        logits = model(x).double()
    handle.remove()
    h = h[0].double()
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    entropy = -(p * logp).sum(dim=1, keepdim=True)
    dz = -p * (logp + entropy)
    expected = dz.norm(dim=1) * torch.sqrt((h * h).sum(dim=1) + 1)
    model.train()  # the scores must switch to eval mode themselves (dropout 0.5 before fc, BatchNorm)
    got = entropy_gradient_norms(model, pool, idx, norm="last_layer", chunk_size=4)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4)


def test_chunk_size_does_not_change_scores():
    model, pool = _bn_net(), _pool(10, 8)
    idx = np.arange(10)
    a = entropy_gradient_norms(model, pool, idx, chunk_size=1)
    b = entropy_gradient_norms(model, pool, idx, chunk_size=3)
    c = entropy_gradient_norms(model, pool, idx)  # automatic chunk
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(a, c, rtol=1e-5)


def test_loss_module_parameters_are_not_part_of_theta():
    torch.manual_seed(0)
    plain = TinyNet()
    with_module = copy.deepcopy(plain)
    get_trainer("loss_prediction").prepare(with_module)
    pool = make_pool(n=12)
    idx = np.arange(12)
    for norm in NORMS:
        a = entropy_gradient_norms(plain, pool, idx, norm=norm)
        b = entropy_gradient_norms(with_module, pool, idx, norm=norm)
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_signal_method_takes_one_backward_pass_per_chunk(monkeypatch):
    """The default method really is the signal one where it applies (one autograd call per chunk, no vmap),
    and hands a model it does not cover to vmap."""
    import activelab.inference.gradients as gradients

    calls = {"grad": 0, "vmap": 0}
    real_grad, real_vmap = torch.autograd.grad, gradients.vmap

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    def counting_vmap(*args, **kwargs):
        calls["vmap"] += 1
        return real_vmap(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(gradients, "vmap", counting_vmap)
    entropy_gradient_norms(_strided_net(), _pool(10, 8), np.arange(10), chunk_size=4)
    assert calls == {"grad": 3, "vmap": 0}
    entropy_gradient_norms(_shared_net(), _pool(10, 8), np.arange(10), chunk_size=4)
    assert calls["vmap"] == 1


def test_bad_norm_and_chunk_are_errors():
    model, pool = _bn_net(), _pool(4, 8)
    with pytest.raises(ActivelabError, match="signals"):
        entropy_gradient_norms(model, pool, np.arange(4), method="loop")
    with pytest.raises(ActivelabError, match="per_tensor_sum"):
        entropy_gradient_norms(model, pool, np.arange(4), norm="frobenius")
    with pytest.raises(ActivelabError, match="chunk_size"):
        entropy_gradient_norms(model, pool, np.arange(4), chunk_size=0)


@pytest.mark.parametrize("name", ["gradnorm", "lplgrad"])
def test_strategy_picks_the_highest_loop_scores(name):
    torch.manual_seed(0)
    model = TinyNet()
    if name == "lplgrad":
        get_trainer("loss_prediction").prepare(model)
    pool, labeled = make_pool(n=40), np.arange(0, 40, 4)
    unlabeled = np.setdiff1d(np.arange(40), labeled)
    picked = activelab.select(name, model, pool, labeled=labeled, budget=5, subset=1000, chunk_size=7)
    scores = entropy_gradient_norms_loop(model, pool, unlabeled)
    expected = unlabeled[np.argsort(-scores)[:5]]
    assert set(picked.tolist()) == set(expected.tolist())


def test_subset_is_seeded_and_bounded():
    torch.manual_seed(0)
    model, pool = TinyNet(), make_pool(n=60)
    labeled = [59]  # with no labels the first round is random (first_round_random), not scored
    a = activelab.select("gradnorm", model, pool, labeled=labeled, budget=4, subset=12, seed=3)
    b = activelab.select("gradnorm", model, pool, labeled=labeled, budget=4, subset=12, seed=3)
    np.testing.assert_array_equal(a, b)
    # with a subset of 4 and budget 4 the strategy returns exactly the seeded subset
    c = activelab.select("gradnorm", model, pool, labeled=labeled, budget=4, subset=4, seed=5)
    rng = np.random.default_rng(5)
    rng.integers(2**31)  # select() seeds torch from the generator first
    expected = np.sort(rng.choice(59, size=4, replace=False))
    np.testing.assert_array_equal(np.sort(c), expected)
    with pytest.raises(ActivelabError, match="subset=3 is smaller than the budget 4"):
        activelab.select("gradnorm", model, pool, labeled=labeled, budget=4, subset=3)


def test_signal_scores_equal_the_loop_in_float64_on_resnet10():
    """In float64 the signal method is exact, not merely close: ResNet-10 (BatchNorm, strided and 1x1 convs, the
    Gram path in layers 3-4, the direct product in layers 1-2) matches the per-sample loop to 1e-10."""
    from activelab.config import ModelConfig
    from activelab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet10", dropout=False), 10, 3, 32).double().eval()
    with torch.no_grad():
        model.fc.weight.mul_(5)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pool = torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long))
    idx = np.arange(4)
    for norm in NORMS:
        got = entropy_gradient_norms(model, pool, idx, norm=norm, chunk_size=2)
        np.testing.assert_allclose(got, entropy_gradient_norms_loop(model, pool, idx, norm=norm), rtol=1e-10)


@pytest.mark.parametrize("name", sorted(AWKWARD_MODELS))
def test_awkward_models_get_the_loop_scores(name):
    """A head that does not reach the logits (zero gradient, not an error), tied weights and a sequence-first
    Linear (both handed to vmap by the planner) give the per-sample loop's scores."""
    torch.manual_seed(0)
    model = AWKWARD_MODELS[name]().eval()
    pool = _pool(9, 8)
    idx = np.arange(9)
    for norm in ("per_tensor_sum", "global"):
        got = entropy_gradient_norms(model, pool, idx, norm=norm, chunk_size=4)
        np.testing.assert_allclose(got, entropy_gradient_norms_loop(model, pool, idx, norm=norm), rtol=1e-4)
