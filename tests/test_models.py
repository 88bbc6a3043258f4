"""Built-in models: shapes, taps, MC dropout, parameter counts, equivalence with torchvision, head swaps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from activelab.config import ModelConfig
from activelab.errors import ActivelabError
from activelab.models import (
    DigitsCNN,
    LeNet,
    available_models,
    build_model,
    count_parameters,
    replace_classifier,
    resnet10,
    resnet18,
)
from activelab.models.introspection import classifier_name, eval_mode, tap_names

CASES = [
    # name, stem, in_channels, image_size
    ("digits_cnn", "cifar", 1, 8),
    ("lenet", "cifar", 1, 28),
    ("lenet", "cifar", 3, 32),
    ("resnet10", "cifar", 3, 32),
    ("resnet10", "imagenet", 3, 64),
    ("resnet18", "cifar", 1, 32),
    ("resnet18", "imagenet", 3, 64),
]


def _build(name, stem="cifar", in_channels=1, size=28, classes=10, dropout=True):
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, stem=stem, dropout=dropout), classes, in_channels, size)


@pytest.mark.parametrize("name,stem,in_channels,size", CASES)
def test_logits_shape_and_declared_names(name, stem, in_channels, size):
    model = _build(name, stem, in_channels, size, classes=7).eval()
    out = model(torch.randn(3, in_channels, size, size))
    assert out.shape == (3, 7)
    assert tap_names(model) == model.default_taps  # every tap exists
    assert classifier_name(model) == model.classifier_name
    head = model.get_submodule(model.classifier_name)
    assert isinstance(head, nn.Linear) and head.out_features == 7


def _tap_channels(model, x):
    seen = {}
    hooks = [
        model.get_submodule(t).register_forward_hook(lambda _m, _i, out, t=t: seen.__setitem__(t, out))
        for t in model.default_taps
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    # global average pooling over spatial dims, as the descriptors do
    return {t: (v.mean(dim=(2, 3)) if v.ndim == 4 else v).shape[1] for t, v in seen.items()}


def test_tap_channels():
    assert _tap_channels(_build("lenet"), torch.randn(2, 1, 28, 28)) == {"conv1": 10, "conv2": 20, "fc1": 50}
    for name in ("resnet10", "resnet18"):
        chans = _tap_channels(_build(name, in_channels=3, size=32), torch.randn(2, 3, 32, 32))
        assert chans == {"layer3": 256, "layer4": 512}
    assert _tap_channels(_build("digits_cnn", size=8), torch.randn(2, 1, 8, 8)) == {
        "conv1": 16,
        "conv2": 32,
        "fc1": 64,
    }


def test_lenet_flat_size_follows_image_size():
    assert LeNet(10, 1, 28).fc1.in_features == 320
    assert LeNet(10, 3, 32).fc1.in_features == 500
    with pytest.raises(ActivelabError, match="16x16"):
        LeNet(10, 1, 12)


def test_lenet_matches_functional_reference():
    """The FK LeNet order: conv -> maxpool -> relu -> dropout, twice; fc1 -> relu -> dropout; fc2."""
    model = _build("lenet").eval()
    x = torch.randn(4, 1, 28, 28)
    h = F.relu(F.max_pool2d(F.conv2d(x, model.conv1.weight, model.conv1.bias), 2))
    h = F.relu(F.max_pool2d(F.conv2d(h, model.conv2.weight, model.conv2.bias), 2))
    h = F.relu(h.reshape(4, 320) @ model.fc1.weight.T + model.fc1.bias)
    ref = h @ model.fc2.weight.T + model.fc2.bias
    torch.testing.assert_close(model(x), ref)


def test_parameter_counts():
    # LeNet, 28x28, 10 classes: conv1 10*25+10, conv2 20*10*25+20, fc1 320*50+50, fc2 50*10+10
    assert count_parameters(_build("lenet")) == 260 + 5020 + 16050 + 510 == 21840
    # the well-known CIFAR ResNet-18 (3x3 stem, no max-pool, 10 classes)
    assert count_parameters(_build("resnet18", in_channels=3, size=32)) == 11_173_962
    # digits CNN, 8x8, 10 classes: 16*9+16, 32*16*9+32, 512*64+64, 64*10+10
    assert count_parameters(_build("digits_cnn", size=8)) == 160 + 4640 + 32832 + 650


@pytest.mark.parametrize("blocks,ours", [([1, 1, 1, 1], resnet10), ([2, 2, 2, 2], resnet18)])
def test_imagenet_stem_equals_torchvision(blocks, ours):
    torch.manual_seed(1)
    reference = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, blocks, num_classes=5)
    model = ours(num_classes=5, in_channels=3, stem="imagenet")
    assert count_parameters(model) == sum(p.numel() for p in reference.parameters())
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))


def test_cifar_stem_keeps_resolution():
    model = _build("resnet10", in_channels=3, size=32).eval()
    seen = []
    model.layer4.register_forward_hook(lambda _m, _i, out: seen.append(out.shape) and None)
    model(torch.randn(1, 3, 32, 32))
    assert seen[0][-2:] == (4, 4)  # 32 / 8: stride-1 stem, no max-pool


@pytest.mark.parametrize("name,size,count", [("lenet", 28, 3), ("digits_cnn", 8, 2), ("resnet10", 32, 4)])
def test_dropout_only_under_mc_sampling(name, size, count):
    in_channels = 3 if name.startswith("resnet") else 1
    model = _build(name, in_channels=in_channels, size=size)
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert len(drops) == count and all(type(m) is nn.Dropout for m in drops)
    x = torch.randn(4, in_channels, size, size)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        torch.testing.assert_close(a, b)
        bn_before = {k: v.clone() for k, v in model.state_dict().items()}
        with eval_mode(model, dropout=True):
            c, d = model(x), model(x)
            assert all(m.training for m in drops)
            assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert not torch.allclose(c, d)
        for k, v in model.state_dict().items():  # BN running statistics untouched by MC passes
            torch.testing.assert_close(v, bn_before[k])
        assert not model.training and not any(m.training for m in drops)
        torch.testing.assert_close(model(x), a)


def test_no_dropout_layers_when_disabled():
    for name, size, ch in [("lenet", 28, 1), ("digits_cnn", 8, 1), ("resnet18", 32, 3)]:
        model = _build(name, in_channels=ch, size=size, dropout=False)
        assert not [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        x = torch.randn(2, ch, size, size)
        with torch.no_grad(), eval_mode(model, dropout=True):
            torch.testing.assert_close(model(x), model(x))
        # state dicts are interchangeable between the two variants
        _build(name, in_channels=ch, size=size, dropout=True).load_state_dict(model.state_dict())


def test_replace_classifier():
    model = _build("lenet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    assert replace_classifier(model, 4) is model
    assert isinstance(model.fc2, nn.Linear) and (model.fc2.in_features, model.fc2.out_features) == (50, 4)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    for k, v in model.state_dict().items():
        if not k.startswith("fc2."):
            assert torch.equal(v, before[k])
    # seeded by the global torch RNG
    other = _build("lenet")
    torch.manual_seed(5)
    replace_classifier(other, 4)
    assert torch.equal(other.fc2.weight, model.fc2.weight)
    torch.manual_seed(6)
    replace_classifier(other, 4)
    assert not torch.equal(other.fc2.weight, model.fc2.weight)
    # back to a fresh C-way head
    replace_classifier(model, 10)
    assert model.fc2.out_features == 10


def test_replace_classifier_resnet_and_undeclared_models():
    model = _build("resnet10", in_channels=3, size=32)
    replace_classifier(model, 4)
    assert (model.fc.in_features, model.fc.out_features) == (512, 4)
    # a model without classifier_name: the last nn.Linear, even nested in a Sequential
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    replace_classifier(net, 2)
    assert isinstance(net[3], nn.Linear) and net[3].out_features == 2 and net[1].out_features == 6


def test_build_model_errors():
    assert available_models() == ["digits_cnn", "lenet", "resnet10", "resnet18"]
    with pytest.raises(ActivelabError, match="available models"):
        build_model(SimpleNamespace(name="vgg", stem="cifar", dropout=True), 10, 1, 28)
    with pytest.raises(ActivelabError, match="stem"):
        build_model(SimpleNamespace(name="resnet10", stem="tiny", dropout=True), 10, 3, 32)
    with pytest.raises(ActivelabError):
        build_model(ModelConfig(name="lenet"), 0, 1, 28)
    assert isinstance(build_model(ModelConfig(name="digits_cnn"), 10, 1, 8), DigitsCNN)
