"""Joint training with a loss-prediction module (Learning Loss for AL, Yoo & Kweon, CVPR 2019), as used by
LL4AL and LPLgrad (2024).

- :class:`LossPredictionModule`: for each tapped stage, global average pool -> Linear(c -> 128) -> ReLU; the
  stage vectors are concatenated -> Linear(128·stages -> 1) = the predicted loss l̂(x).
- :func:`ranking_loss`: the pairwise margin ranking loss between predicted and (detached) true losses.
- :class:`LossPredictionTrainer` (``TRAINER``, trainer name ``"loss_prediction"``): the standard trainer's
  loop with the batch loss CE + λ·L_pred; after ``cfg.detach_epoch`` epochs the tapped features are detached
  before the module, so the backbone then learns from CE only. One optimiser and one schedule cover backbone
  and module (the reference code never stepped the module's schedule; here both decay together).

Deviations from the reference code: the module's learning rate follows the same schedule as the backbone
(bug fixed); ties of the true losses give sign 0 (the reference counted them as "i is smaller"); an odd batch
leaves its middle sample unpaired instead of failing an assertion; features are detached from 0-based epoch
``detach_epoch`` on, i.e. after ``detach_epoch`` full epochs (the reference's ``epoch > 120`` started one later).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..data.arrays import iter_batches
from ..errors import ActivelabError
from ..models.introspection import (
    TapCapture,
    classifier_name,
    eval_mode,
    mark_auxiliary,
    model_device,
    named_module,
    pool_activation,
)
from .supervised import StandardTrainer

if TYPE_CHECKING:
    from ..config import TrainConfig

#: The attribute under which :meth:`LossPredictionTrainer.prepare` attaches the module.
MODULE_ATTR = "loss_module"
HIDDEN = 128
STAGES = ("layer1", "layer2", "layer3", "layer4")


class LossPredictionModule(nn.Module):
    """Predicted loss from pooled tapped activations.

    ``taps`` (module names of the backbone, stored as a plain attribute, not in the state dict) and
    ``channels`` (the channel count of each tap's output).
    """

    def __init__(self, taps: Sequence[str], channels: Sequence[int], hidden: int = HIDDEN) -> None:
        super().__init__()
        if not taps:
            raise ActivelabError("the loss-prediction module needs at least one tapped layer")
        if len(channels) != len(taps):
            raise ActivelabError(f"{len(taps)} taps but {len(channels)} channel counts")
        self.taps = list(taps)
        self.stages = nn.ModuleList(nn.Linear(int(c), hidden) for c in channels)
        self.out = nn.Linear(hidden * len(taps), 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B,) predicted losses from the tapped activations (B, C_s, ...) in tap order."""
        if len(features) != len(self.stages):
            raise ActivelabError(f"expected {len(self.stages)} tapped activations, got {len(features)}")
        hidden = [F.relu(layer(pool_activation(f))) for layer, f in zip(self.stages, features, strict=True)]
        return self.out(torch.cat(hidden, dim=1)).squeeze(1)


def ranking_loss(predicted: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Pairwise margin ranking loss of Learning Loss for AL.

    Sample i is paired with sample B-1-i for i < B//2 (an odd batch leaves its middle sample out). The loss
    is the mean over pairs of ``max(0, -sign(l_i - l_j)·(l̂_i - l̂_j) + margin)``. ``target`` (the true
    per-sample losses) is detached here. A batch of fewer than two samples gives 0 (with a graph).
    """
    if predicted.shape != target.shape or predicted.ndim != 1:
        raise ActivelabError(
            f"predicted and true losses must be 1-D of one length; got {predicted.shape} and {target.shape}"
        )
    half = len(predicted) // 2
    if half == 0:
        return predicted.sum() * 0.0
    target = target.detach()
    diff_pred = predicted[:half] - predicted.flip(0)[:half]
    sign = torch.sign(target[:half] - target.flip(0)[:half])
    return torch.clamp(margin - sign * diff_pred, min=0).mean()


def default_loss_prediction_taps(model: nn.Module) -> list[str]:
    """The stages the module reads: ``model.loss_prediction_taps`` if declared, else the ResNet stages
    layer1..layer4 when the model has them, else the model's ``default_taps`` (LeNet: conv1, conv2, fc1)."""
    declared = getattr(model, "loss_prediction_taps", None)
    if declared:
        return list(declared)
    names = {n for n, _ in model.named_modules()}
    if all(s in names for s in STAGES):
        return list(STAGES)
    taps = getattr(model, "default_taps", None)
    if taps:
        return list(taps)
    raise ActivelabError(
        "the loss-prediction trainer needs the model's stages: set model.loss_prediction_taps (or "
        "default_taps) to module names whose outputs feed the loss-prediction module"
    )


def loss_module(model: nn.Module) -> LossPredictionModule:
    """The model's attached module, or a clear error."""
    module = getattr(model, MODULE_ATTR, None)
    if not isinstance(module, LossPredictionModule):
        raise ActivelabError(
            "the model has no loss-prediction module: train it with the loss_prediction trainer "
            "(get_trainer('loss_prediction').prepare(model), then fit)"
        )
    return module


def forward_with_taps(model: nn.Module, x: torch.Tensor, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, predicted losses) of one batch; ``detach`` cuts the module off from the backbone's graph."""
    module = loss_module(model)
    with TapCapture(model, module.taps) as capture:
        logits = model(x)
        features = capture.take()
    if detach:
        features = [f.detach() for f in features]
    return logits, module(features)


#: Image sides tried, in order, when the model does not declare ``input_shape``.
PROBE_SIDES = (32, 28, 224, 64, 96, 16, 8)


def _first_layer(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return m
    return None


def _probe_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Input shapes (without the batch dimension) for the dry forward pass: ``model.input_shape`` if
    declared, else shapes built from the first layer's input width (common image sides for a conv)."""
    declared = getattr(model, "input_shape", None)
    if declared is not None:
        return [tuple(int(s) for s in declared)]
    first = _first_layer(model)
    if isinstance(first, nn.Linear):
        return [(first.in_features,)]
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
        return [(first.in_channels, *([side] * dims)) for side in PROBE_SIDES]
    return []


@torch.no_grad()
def tap_channels(model: nn.Module, taps: Sequence[str]) -> list[int]:
    """Channel counts of the tapped outputs, from a dry forward pass on a zero input (eval mode, no
    gradients, so BatchNorm statistics are untouched). Channel counts do not depend on the image side, so
    any side the model accepts gives the right answer."""
    device = model_device(model)
    errors = []
    for shape in _probe_shapes(model):
        try:
            with eval_mode(model), TapCapture(model, taps) as capture:
                model(torch.zeros((2, *shape), device=device))
                features = capture.take()
        except ActivelabError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            errors.append(f"{shape}: {str(exc).splitlines()[0]}")
            continue
        return [int(pool_activation(f).shape[1]) for f in features]
    raise ActivelabError(
        "cannot infer the channel counts of the loss-prediction taps: set model.input_shape = (C, H, W) "
        "(the shape of one input) so that a dry forward pass can run"
        + (f"; tried {'; '.join(errors)}" if errors else "")
    )


@torch.no_grad()
def predicted_losses(model: nn.Module, dataset: Dataset, indices: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """l̂(x) for ``dataset[indices]`` in order (model in eval mode), float64 (N,). O(N) memory."""
    loss_module(model)
    device = model_device(model)
    out = []
    with eval_mode(model):
        for x, _ in iter_batches(dataset, np.asarray(indices, dtype=np.int64), batch_size):
            out.append(forward_with_taps(model, x.to(device))[1].double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float64)


class LossPredictionTrainer(StandardTrainer):
    """CE + λ·ranking loss through the standard trainer's loop (optimiser, schedule, augmentation, selection).

    - ``prepare(model)``: attaches ``model.loss_module`` (a :class:`LossPredictionModule` on
      :func:`default_loss_prediction_taps`, or ``taps`` given here) if absent, so state dicts and checkpoints
      carry it; idempotent. Its weights are drawn from the global torch RNG (seed it first). Channel counts
      come from :func:`tap_channels` (a dry forward pass on ``model.input_shape``, or probed image sides).
      A model without ``classifier_name`` gets one pointing at its current last ``nn.Linear``, since the
      module's own Linear layers now come after it.
    - ``cfg.loss_weight`` (λ), ``cfg.loss_margin`` (ξ), ``cfg.detach_epoch``: epochs with 0-based index
      ``>= detach_epoch`` feed detached features to the module (None: never detach).
    """

    name = "loss_prediction"

    def __init__(self, taps: Sequence[str] | None = None, hidden: int = HIDDEN) -> None:
        self.taps = list(taps) if taps is not None else None
        self.hidden = hidden

    def prepare(self, model: nn.Module) -> None:
        if isinstance(getattr(model, MODULE_ATTR, None), LossPredictionModule):
            return
        if hasattr(model, MODULE_ATTR):
            raise ActivelabError(f"the model already has an attribute {MODULE_ATTR!r} that is not the module")
        if not getattr(model, "classifier_name", None):
            model.classifier_name = classifier_name(model)
        taps = self.taps or default_loss_prediction_taps(model)
        for name in taps:
            named_module(model, name)
        module = LossPredictionModule(taps, tap_channels(model, taps), self.hidden)
        setattr(model, MODULE_ATTR, module.to(model_device(model)))
        mark_auxiliary(model, MODULE_ATTR)

    def training_loss(self, model, x, y, epoch, cfg):
        ce, lpl, logits = joint_loss(model, x, y, epoch, cfg)
        return ce + cfg.loss_weight * lpl, logits


def joint_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean CE, ranking loss L_pred, logits) of one batch at 0-based ``epoch``.

    From epoch ``cfg.detach_epoch`` on (0-based; None: never) the tapped features are detached before the
    module, so L_pred then trains the module only.
    """
    detach = cfg.detach_epoch is not None and epoch >= cfg.detach_epoch
    logits, predicted = forward_with_taps(model, x, detach=detach)
    losses = F.cross_entropy(logits, y, reduction="none")
    return losses.mean(), ranking_loss(predicted, losses, cfg.loss_margin), logits


TRAINER = LossPredictionTrainer()
