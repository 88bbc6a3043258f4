"""LPLgrad's training side: the loss-prediction module, the ranking loss, detaching, the joint trainer, LL4AL."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

import activelab
from activelab.config import TrainConfig
from activelab.data.arrays import ArrayDataset
from activelab.errors import ActivelabError
from activelab.models import LeNet, resnet10
from activelab.models.introspection import classifier_name
from activelab.train import get_trainer
from activelab.train.loss_prediction import (
    LossPredictionModule,
    LossPredictionTrainer,
    joint_loss,
    predicted_losses,
    ranking_loss,
)

from .conftest import TinyNet, make_pool

TRAINER = get_trainer("loss_prediction")


def _prepared_tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    TRAINER.prepare(model)
    return model


# -- ranking loss ---------------------------------------------------------------------------------------------
def test_ranking_loss_hand_example():
    # pairs (0, 3) and (1, 2).
    # (0, 3): l0 - l3 = 1 - 3 < 0 -> sign -1; l̂0 - l̂3 = 2.5; max(0, 2.5 + 1) = 3.5
    # (1, 2): l1 - l2 = 2 - 0.5 > 0 -> sign +1; l̂1 - l̂2 = -1; max(0, 1 + 1) = 2
    pred = torch.tensor([3.0, 1.0, 2.0, 0.5])
    true = torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert ranking_loss(pred, true, 1.0).item() == pytest.approx(2.75)
    assert ranking_loss(pred, true, 0.5).item() == pytest.approx((3.0 + 1.5) / 2)
    # odd batch: the middle sample (index 2) is not paired; pairs (0, 4), (1, 3) are the same as above
    pred5, true5 = torch.tensor([3.0, 1.0, 9.0, 2.0, 0.5]), torch.tensor([1.0, 2.0, 7.0, 0.5, 3.0])
    assert ranking_loss(pred5, true5, 1.0).item() == pytest.approx(2.75)
    # a correctly ordered pair beyond the margin costs nothing
    assert ranking_loss(torch.tensor([5.0, 0.0]), torch.tensor([2.0, 1.0]), 1.0).item() == 0.0
    assert ranking_loss(torch.tensor([1.0]), torch.tensor([2.0]), 1.0).item() == 0.0


def test_ranking_loss_does_not_backpropagate_into_true_losses():
    pred = torch.tensor([0.3, -0.2, 0.1, 0.9], requires_grad=True)
    true = torch.tensor([1.0, 2.0, 0.5, 3.0], requires_grad=True)
    ranking_loss(pred, true).backward()
    assert true.grad is None
    # d/d l̂: pair (0,3) sign -1 -> +1 on l̂0, -1 on l̂3; pair (1,2) sign +1 -> -1 on l̂1, +1 on l̂2; / 2 pairs
    np.testing.assert_allclose(pred.grad.numpy(), [0.5, -0.5, 0.5, -0.5])


# -- the module -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "taps", "channels"),
    [
        (lambda: resnet10(10, 3), ["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
        (lambda: LeNet(10, 1, 28), ["conv1", "conv2", "fc1"], [10, 20, 50]),
        (TinyNet, ["conv1", "conv2", "fc1"], [4, 6, 12]),
    ],
    ids=["resnet10", "lenet", "tiny"],
)
def test_prepare_attaches_module_on_the_stages(factory, taps, channels):
    torch.manual_seed(0)
    model = factory()
    before = copy.deepcopy(model.state_dict())
    TRAINER.prepare(model)
    module = model.loss_module
    assert isinstance(module, LossPredictionModule) and module.taps == taps
    assert [layer.in_features for layer in module.stages] == channels
    assert all(layer.out_features == 128 for layer in module.stages)
    assert (module.out.in_features, module.out.out_features) == (128 * len(taps), 1)
    assert "loss_module.out.weight" in model.state_dict()
    for k, v in before.items():  # the dry forward pass changed nothing (BatchNorm statistics included)
        assert torch.equal(model.state_dict()[k], v), k
    TRAINER.prepare(model)  # idempotent
    assert model.loss_module is module


def test_module_output_matches_a_hand_computation():
    model = _prepared_tiny()
    pool = make_pool(n=10)
    x, _ = pool.batch(np.arange(10))
    module = model.loss_module
    with torch.no_grad():
        a1 = model.conv1(x)
        a2 = model.conv2(torch.relu(a1))
        a3 = model.fc1(torch.max_pool2d(torch.relu(a2), 2).flatten(1))
        pooled = [a1.mean(dim=(2, 3)), a2.mean(dim=(2, 3)), a3]
        hidden = torch.cat([torch.relu(lin(p)) for lin, p in zip(module.stages, pooled, strict=True)], dim=1)
        expected = module.out(hidden).squeeze(1)
    model.train()  # predicted_losses must use eval mode (TinyNet has dropout after conv2)
    np.testing.assert_allclose(predicted_losses(model, pool, np.arange(10), 4), expected.numpy(), rtol=1e-5)


def test_generic_model_keeps_its_classifier():
    class Plain(nn.Module):  # no classifier_name: the last nn.Linear is the classifier until prepare
        default_taps = ["body.0", "body.2"]

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU())
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.body(x))

    model = Plain()
    TRAINER.prepare(model)
    assert [layer.in_features for layer in model.loss_module.stages] == [8, 5]
    assert classifier_name(model) == "head"


def test_checkpoint_round_trip_carries_the_module():
    model = _prepared_tiny(0)
    other = _prepared_tiny(1)
    pool = make_pool(n=8)
    assert not np.allclose(predicted_losses(model, pool, np.arange(8)), predicted_losses(other, pool, np.arange(8)))
    other.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(
        predicted_losses(model, pool, np.arange(8)), predicted_losses(other, pool, np.arange(8))
    )


def test_model_without_stages_or_shape_is_a_clear_error():
    bare = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ActivelabError, match="loss_prediction_taps"):
        LossPredictionTrainer().prepare(bare)


# -- detaching ------------------------------------------------------------------------------------------------
def _grads_from_ranking_loss(model, epoch, detach_epoch):
    pool = make_pool(n=16)
    x, y = pool.batch(np.arange(16))
    model.zero_grad(set_to_none=True)
    _, lpl, _ = joint_loss(model, x, y, epoch, TrainConfig(detach_epoch=detach_epoch))
    lpl.backward()
    backbone = [p.grad for n, p in model.named_parameters() if not n.startswith("loss_module.")]
    module = [p.grad for p in model.loss_module.parameters()]
    norm = lambda gs: sum(float(g.abs().sum()) for g in gs if g is not None)  # noqa: E731
    return norm(backbone), norm(module)


def test_detaching_stops_the_ranking_loss_at_the_module():
    model = _prepared_tiny()
    before_backbone, before_module = _grads_from_ranking_loss(model, epoch=2, detach_epoch=3)
    after_backbone, after_module = _grads_from_ranking_loss(model, epoch=3, detach_epoch=3)
    never_backbone, _ = _grads_from_ranking_loss(model, epoch=500, detach_epoch=None)
    assert before_backbone > 0 and never_backbone > 0
    assert after_backbone == 0.0
    assert before_module > 0 and after_module > 0


def test_training_loss_is_ce_plus_weighted_ranking_loss():
    model = _prepared_tiny()
    x, y = make_pool(n=12).batch(np.arange(12))
    cfg = TrainConfig(loss_weight=0.3, loss_margin=0.7)
    total, logits = TRAINER.training_loss(model, x, y, 0, cfg)
    with torch.no_grad():
        ce = F.cross_entropy(logits, y, reduction="none")
        pred = predicted_losses(model, make_pool(n=12), np.arange(12), 12)  # eval mode: no dropout
    model.eval()
    total_eval, logits_eval = TRAINER.training_loss(model, x, y, 0, cfg)
    ce_eval = F.cross_entropy(logits_eval, y, reduction="none")
    expected = ce_eval.mean() + 0.3 * ranking_loss(torch.from_numpy(pred).float(), ce_eval, 0.7)
    assert total_eval.item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() > ce.mean().item() - 1e-6  # the ranking term is non-negative


# -- the trainer ---------------------------------------------------------------------------------------------
def graded_blobs(n: int, seed: int) -> ArrayDataset:
    """4 classes on 8x8 images: class c lights its own 2x2 square with a random strength in [0, 1], over noise.
    Faint samples are ambiguous (high loss); bright ones are easy, so the loss is predictable from the input."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    strength = torch.rand(n, generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 90
    for c in range(4):
        r, col = 2 * (c // 2) + 1, 2 * (c % 2) + 3
        rows = y == c
        x[rows, :, r : r + 2, col : col + 2] += (strength[rows] * 160).view(-1, 1, 1, 1)
    return ArrayDataset(x.clamp(0, 255).to(torch.uint8), y, mean=[0.2], std=[0.3])


def test_trainer_learns_to_predict_the_loss():
    train, test = graded_blobs(128, 0), graded_blobs(256, 1)
    model = _prepared_tiny()
    x, y = test.batch(np.arange(256))

    def rank_correlation() -> float:
        model.eval()
        with torch.no_grad():
            true = F.cross_entropy(model(x), y, reduction="none").numpy()
        return spearmanr(predicted_losses(model, test, np.arange(256)), true).statistic

    before = rank_correlation()
    cfg = TrainConfig(lr=0.05, momentum=0.9, batch_size=32, epochs=15, milestones=[12], detach_epoch=9)
    result = TRAINER.fit(model, train, np.arange(128), cfg, generator=torch.Generator().manual_seed(0))
    # one schedule: the milestone applies (the module's parameters are in the same optimiser, see below)
    assert result.epochs == 15 and [h["lr"] for h in result.history][11:13] == pytest.approx([0.05, 0.005])
    after = rank_correlation()
    assert after > 0.5 and after > before + 0.3, (before, after)


def test_module_is_in_the_one_optimiser():
    model = _prepared_tiny()
    optimised = {id(p) for p in TRAINER.parameters(model)}
    assert all(id(p) in optimised for p in model.loss_module.parameters())
    assert all(id(p) in optimised for p in model.conv1.parameters())


# -- ll4al ---------------------------------------------------------------------------------------------------
def test_ll4al_picks_the_highest_predicted_losses():
    model = _prepared_tiny()
    pool, labeled = make_pool(n=50), np.arange(0, 50, 5)
    unlabeled = np.setdiff1d(np.arange(50), labeled)
    picked = activelab.select("ll4al", model, pool, labeled=labeled, budget=6, subset=10_000)
    scores = predicted_losses(model, pool, unlabeled)
    assert set(picked.tolist()) == set(unlabeled[np.argsort(-scores)[:6]].tolist())


def test_ll4al_without_module_says_which_trainer():
    torch.manual_seed(0)
    with pytest.raises(ActivelabError, match="loss_prediction trainer"):
        activelab.select("ll4al", TinyNet(), make_pool(n=20), labeled=[0], budget=3)


def test_strategies_declare_their_training():
    from activelab.strategies.base import get_strategy

    assert get_strategy("lplgrad").training == "loss_prediction"
    assert get_strategy("ll4al").training == "loss_prediction"
    assert get_strategy("gradnorm").training == "standard"
    assert get_strategy("coreset").training == "standard"
