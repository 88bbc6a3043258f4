"""The built-in models and the helpers the runner uses to build them and swap their heads.

Every built-in model returns logits and declares ``default_taps`` (layers whose activations strategies
read) and ``classifier_name`` (its final ``nn.Linear``; its input is the embedding). Dropout layers are
``nn.Dropout`` modules, off in eval mode; :class:`activelab.models.introspection.eval_mode` with
``dropout=True`` turns them on for MC sampling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..errors import ActivelabError
from ..plugins import is_plugin, load_plugin
from .digits import DigitsCNN
from .introspection import classifier_name as _classifier_name
from .lenet import LeNet
from .resnet import BasicBlock, ResNet, resnet10, resnet18

if TYPE_CHECKING:
    from ..config import ModelConfig

MODELS = ("digits_cnn", "lenet", "resnet10", "resnet18")

__all__ = [
    "MODELS",
    "BasicBlock",
    "DigitsCNN",
    "LeNet",
    "ResNet",
    "available_models",
    "build_model",
    "count_parameters",
    "replace_classifier",
    "resnet10",
    "resnet18",
]


def available_models() -> list[str]:
    """Names accepted by :func:`build_model` (``model.name`` in a config)."""
    return list(MODELS)


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A freshly initialised model (weights drawn from the global torch RNG: seed it first).

    Args:
        cfg: ``name`` (digits_cnn, lenet, resnet10, resnet18, or ``"package.module:factory"`` for a model of
            your own: ``factory(num_classes[, in_channels, image_size])``), ``stem`` (cifar or imagenet; ResNets
            only) and ``dropout`` (build the MC-dropout layers).
        num_classes: outputs of the classifier.
        in_channels: image channels (1 for MNIST, 3 for SVHN).
        image_size: image side in pixels (images are square).
    """
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ActivelabError(
            f"build_model needs positive num_classes, in_channels and image_size; "
            f"got {num_classes}, {in_channels}, {image_size}"
        )
    name, dropout = cfg.name, cfg.dropout
    if is_plugin(name):
        return _plugin_model(name, num_classes, in_channels, image_size)
    if name == "lenet":
        return LeNet(num_classes, in_channels, image_size, dropout)
    if name == "digits_cnn":
        return DigitsCNN(num_classes, in_channels, image_size, dropout)
    if name in ("resnet10", "resnet18"):
        stem = getattr(cfg, "stem", "cifar")
        if stem not in ("cifar", "imagenet"):
            raise ActivelabError(f"unknown ResNet stem {stem!r}; choose 'cifar' (32-pixel images) or 'imagenet'")
        factory = resnet10 if name == "resnet10" else resnet18
        return factory(num_classes, in_channels, stem, dropout)
    raise ActivelabError(f"unknown model {name!r}; available models: {', '.join(MODELS)}")


def _plugin_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A model of the user's own: ``factory(num_classes)``, also given ``in_channels`` and ``image_size`` when
    its signature accepts them."""
    import inspect

    factory = load_plugin(name, "model")
    if not callable(factory):
        raise ActivelabError(f"model {name!r} is not callable: name a factory taking the number of classes")
    accepted = inspect.signature(factory).parameters
    extra = {k: v for k, v in (("in_channels", in_channels), ("image_size", image_size)) if k in accepted}
    model = factory(num_classes, **extra)
    if not isinstance(model, nn.Module):
        raise ActivelabError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def replace_classifier(model: nn.Module, out_features: int) -> nn.Module:
    """Swap the classifier for a fresh ``nn.Linear(in_features, out_features)``, in place; returns ``model``.

    The classifier is the module named by ``model.classifier_name`` (else the last ``nn.Linear``). The new
    layer is initialised from the global torch RNG (seed it for reproducibility) and placed on the old layer's
    device and dtype. Used for the 4-way rotation head and to re-attach a fresh C-way head after pretraining.
    """
    if out_features < 1:
        raise ActivelabError(f"out_features must be positive; got {out_features}")
    name = _classifier_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if not isinstance(old, nn.Linear):
        raise ActivelabError(f"the classifier {name!r} is a {type(old).__name__}, not an nn.Linear")
    weight = old.weight
    new = nn.Linear(old.in_features, out_features, bias=old.bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    setattr(parent, attr, new)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
