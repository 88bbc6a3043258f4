"""FK descriptors against per-sample autograd loops, and the perturbation estimators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from activelab.errors import ActivelabError
from activelab.inference import descriptors as D
from activelab.inference.descriptors import (
    compute_descriptors,
    gaussian_mutual_information,
    perturb,
    perturbed_class_scores,
)

from .conftest import TinyNet, make_pool

TAPS = ["conv1", "conv2", "fc1"]


class BNNet(TinyNet):
    """TinyNet with a BatchNorm after conv1 (eval mode must keep samples independent)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(self.drop(x.flatten(1))))
        return self.fc2(self.drop(x))


def per_sample_reference(model, pool, idx, labels):
    """One sample at a time: pooled activations and d CE(logits, s) / d activations, pooled."""
    zs, gs = [], []
    model.eval()
    for i, s in zip(idx, labels, strict=True):
        acts = {}
        hooks = [
            model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n, acts=acts: acts.__setitem__(n, o))
            for n in TAPS
        ]
        x = pool[int(i)][0].unsqueeze(0)
        logits = model(x)
        for h in hooks:
            h.remove()
        tensors = [acts[n] for n in TAPS]
        loss = F.cross_entropy(logits, torch.tensor([int(s)]))
        grads = torch.autograd.grad(loss, tensors)
        pool_ = lambda t: t.mean(dim=(2, 3)) if t.ndim == 4 else t  # noqa: E731
        zs.append(torch.cat([pool_(t.detach()) for t in tensors], 1))
        gs.append(torch.cat([pool_(g) for g in grads], 1))
    return torch.cat(zs).numpy(), torch.cat(gs).numpy()


@pytest.mark.parametrize("net", [TinyNet, BNNet])
def test_fisher_scores_equal_per_sample_autograd(net):
    torch.manual_seed(0)
    model = net()
    pool = make_pool(30)
    idx = np.arange(3, 30, 2)
    given = np.random.default_rng(0).integers(0, 4, len(idx))
    out = compute_descriptors(model, pool, idx, TAPS, {"given": given, "argmax": "argmax"}, batch_size=4)
    assert model.training  # mode restored
    z_ref, g_ref = per_sample_reference(model, pool, idx, given)
    np.testing.assert_allclose(out.z, z_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.g["given"], g_ref, rtol=1e-4, atol=1e-7)
    argmax = out.logits.argmax(1)
    np.testing.assert_array_equal(out.labels["argmax"], argmax)
    _, g_arg = per_sample_reference(model, pool, idx, argmax)
    np.testing.assert_allclose(out.g["argmax"], g_arg, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(out.segments, [0, 4, 10, 22])


def test_label_function_sees_batch_and_earlier_gradients():
    torch.manual_seed(0)
    model, pool = TinyNet(), make_pool(20)
    seen = []

    def fn(state):
        seen.append((state.positions.copy(), set(state.g)))
        return torch.full((len(state.positions),), 2, dtype=torch.int64)

    out = compute_descriptors(model, pool, np.arange(20), TAPS, {"first": "argmax", "fn": fn}, batch_size=8)
    assert [p.tolist() for p, _ in seen] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    assert all(keys == {"first"} for _, keys in seen)
    _, g2 = per_sample_reference(model, pool, np.arange(20), np.full(20, 2))
    np.testing.assert_allclose(out.g["fn"], g2, rtol=1e-4, atol=1e-7)


def test_frozen_weights_still_give_activation_gradients():
    torch.manual_seed(0)
    model, pool = TinyNet(), make_pool(10)
    for p in model.parameters():
        p.requires_grad_(False)
    out = compute_descriptors(model, pool, np.arange(10), TAPS, {"a": "argmax"})
    for p in model.parameters():
        p.requires_grad_(True)
    _, g_ref = per_sample_reference(model, pool, np.arange(10), out.labels["a"])
    np.testing.assert_allclose(out.g["a"], g_ref, rtol=1e-4, atol=1e-7)


def test_no_labels_is_a_forward_pass_only():
    torch.manual_seed(0)
    model, pool = TinyNet(), make_pool(10)
    out = compute_descriptors(model, pool, np.arange(10), ["conv2"])
    assert out.g == {} and out.z.shape == (10, 6)
    np.testing.assert_array_equal(out.segments, [0, 6])


def test_bad_tap_is_an_error():
    with pytest.raises(ActivelabError, match="no module named"):
        compute_descriptors(TinyNet(), make_pool(4), np.arange(4), ["nope"])


# -- perturbations -------------------------------------------------------------------------------------------


def test_perturb_identity_and_quarter_turn():
    x = torch.randn(3, 2, 6, 6)
    np.testing.assert_allclose(perturb(x, torch.zeros(3), torch.zeros_like(x)), x, atol=1e-6)
    turned = perturb(x, torch.full((3,), math.pi / 2), torch.zeros_like(x))
    # a +90 degree rotation of the sampling grid equals one of the exact quarter turns
    assert any(torch.allclose(turned, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))
    noise = torch.randn_like(x)
    np.testing.assert_allclose(perturb(x, torch.zeros(3), noise), x + noise, atol=1e-6)


def test_rotation_sigma_is_degrees_converted_to_radians(monkeypatch):
    angles = []
    real = D.perturb

    def spy(x, a, n):
        angles.append(a.clone())
        assert float(n.std()) == pytest.approx(0.01, rel=0.2)
        return real(x, a, n)

    monkeypatch.setattr(D, "perturb", spy)
    torch.manual_seed(0)
    perturbed_class_scores(
        TinyNet(), make_pool(40), np.arange(40), TAPS, "trace_cov", 16, torch.Generator().manual_seed(0)
    )
    a = torch.cat(angles)
    assert len(a) == 40 * 16
    assert float(a.std()) == pytest.approx(math.radians(5.0), rel=0.15)  # not 5 radians


def test_trace_cov_without_perturbation_equals_closed_form():
    torch.manual_seed(0)
    model, pool, idx = TinyNet(), make_pool(12), np.arange(12)
    k = 3
    scores = perturbed_class_scores(
        model, pool, idx, TAPS, "trace_cov", k, torch.Generator().manual_seed(0), rotation_degrees=0.0,
        noise_std=0.0, batch_size=5,
    )  # fmt: skip
    assert scores.shape == (12, 4)
    for c in range(4):
        d = compute_descriptors(model, pool, idx, TAPS, {"c": np.full(12, c)})
        np.testing.assert_allclose(scores[:, c], k * (d.z * d.g["c"]).sum(1), rtol=1e-4, atol=1e-6)


def test_gaussian_mutual_information_matches_slogdet_and_orders_dependence():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 50, 3))
    g = np.stack([rng.normal(size=(50, 2)), z[1, :, :2] @ rng.normal(size=(2, 2)) + 0.05 * rng.normal(size=(50, 2))])
    mi = gaussian_mutual_information(torch.tensor(z), torch.tensor(g), ridge=1e-6).numpy()

    def ref(a, b):
        def cov(x):
            x = x - x.mean(0)
            return x.T @ x / (len(x) - 1)

        def ld(m, r):
            return np.linalg.slogdet(m + r * np.eye(len(m)))[1]

        rz = 1e-6 * np.diag(cov(a)).mean() + 1e-12
        rg = 1e-6 * np.diag(cov(b)).mean() + 1e-12
        joint = cov(np.concatenate([a, b], 1)) + np.diag([rz] * a.shape[1] + [rg] * b.shape[1])
        return ld(cov(a), rz) + ld(cov(b), rg) - np.linalg.slogdet(joint)[1]

    np.testing.assert_allclose(mi, [ref(z[0], g[0]), ref(z[1], g[1])], rtol=1e-6)
    assert mi[0] < 0.5 < 4 < mi[1]  # independent ~ 0, dependent large


def test_mutual_info_scores_finite_and_not_constant():
    torch.manual_seed(0)
    scores = perturbed_class_scores(
        TinyNet(), make_pool(10), np.arange(10), TAPS, "mutual_info", 6, torch.Generator().manual_seed(1)
    )
    assert scores.shape == (10, 4)
    assert np.all(np.isfinite(scores))
    assert np.ptp(scores, axis=1).min() > 0  # varies over classes for every sample
    assert np.ptp(scores[:, 0]) > 0  # and over samples


def test_unknown_perturbation_kind_is_an_error():
    with pytest.raises(ActivelabError, match="unknown perturbation"):
        perturbed_class_scores(TinyNet(), make_pool(4), np.arange(4), TAPS, "diag", 4, torch.Generator())


def test_lenet_activation_taps_read_after_pooling_and_relu():
    """taps=[act1, act2, act3] are the FK authors' tap points: the activations after max-pool + ReLU (convs) and
    ReLU (fc1), checked against a hand-written LeNet forward; the default taps read the layers' outputs."""
    from activelab.models import LeNet

    torch.manual_seed(0)
    model = LeNet(num_classes=10).eval()
    pool = make_pool(6, size=28)
    idx = np.arange(6)
    given = np.array([0, 3, 1, 9, 2, 5])
    out = compute_descriptors(model, pool, idx, ["act1", "act2", "act3"], {"given": given}, batch_size=4)
    x = torch.stack([pool[i][0] for i in idx]).requires_grad_(False)
    a1 = torch.relu(F.max_pool2d(F.conv2d(x, model.conv1.weight, model.conv1.bias), 2))
    a2 = torch.relu(F.max_pool2d(F.conv2d(a1, model.conv2.weight, model.conv2.bias), 2))
    a3 = torch.relu(F.linear(a2.flatten(1), model.fc1.weight, model.fc1.bias))
    expected = torch.cat([a1.mean(dim=(2, 3)), a2.mean(dim=(2, 3)), a3], dim=1).detach().numpy()
    np.testing.assert_allclose(out.z, expected, rtol=1e-5, atol=1e-6)
    assert out.z.shape == (6, 80) and np.all(out.z >= 0)  # after ReLU: never negative
    default = compute_descriptors(model, pool, idx, list(LeNet.default_taps), {}, batch_size=4)
    assert default.z.min() < 0  # the layers' outputs, before ReLU
    assert set(model.state_dict()) == {f"{n}.{p}" for n in ("conv1", "conv2", "fc1", "fc2") for p in ("weight", "bias")}
