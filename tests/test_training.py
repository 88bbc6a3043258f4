"""Supervised training: convergence, early stop, schedule, model selection, determinism, augmentation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from activelab.config import ModelConfig, TrainConfig
from activelab.data.arrays import ArrayDataset
from activelab.errors import ActivelabError
from activelab.models import build_model
from activelab.train import Trainer, available_trainers, get_trainer
from activelab.train.augment import augment_batch, crop_padding, random_crop, random_flip, shift_crop
from activelab.train.schedules import build_optimizer, build_scheduler
from activelab.train.supervised import TRAINER, StandardTrainer, accuracy, evaluate


def blobs(n: int, classes: int = 4, size: int = 8, seed: int = 0) -> ArrayDataset:
    """Separable 8x8 images: class c lights up its own 2x2 square, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 60, (n, 1, size, size), generator=g).to(torch.uint8)
    for c in range(classes):
        r, col = 2 * (c // 2) + 1, 2 * (c % 2) + 3
        x[y == c, :, r : r + 2, col : col + 2] = 250
    return ArrayDataset(x, y, mean=[0.2], std=[0.3])


def digits_model(seed: int = 0, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="digits_cnn"), classes, 1, 8)


def fit(model, data, cfg, seed=0, **kw):
    return TRAINER.fit(model, data, np.arange(len(data)), cfg, generator=torch.Generator().manual_seed(seed), **kw)


def test_registry():
    assert available_trainers() == ["loss_prediction", "standard"]
    trainer = get_trainer("standard")
    assert trainer is TRAINER and isinstance(trainer, StandardTrainer) and isinstance(trainer, Trainer)
    with pytest.raises(ActivelabError, match="loss_prediction, standard"):
        get_trainer("nope")


def test_learns_a_separable_problem():
    train, test = blobs(96), blobs(64, seed=1)
    model = digits_model()
    result = fit(model, train, TrainConfig(epochs=8, lr=0.05, momentum=0.9, batch_size=16))
    assert result.epochs == 8 and result.selected_epoch == 8 and result.val_accuracy is None
    assert result.train_accuracy >= 0.95 and result.seconds > 0 and result.eval_seconds == 0
    preds = evaluate(model, test, np.arange(64))
    assert (preds == test.targets).mean() >= 0.95


def test_adam_path():
    cfg = TrainConfig(optimizer="adam", lr=1e-3, weight_decay=1e-4, epochs=6, batch_size=16)
    opt = build_optimizer(nn.Linear(2, 2).parameters(), cfg)
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 1e-4
    sgd = build_optimizer(nn.Linear(2, 2).parameters(), TrainConfig(momentum=0.7, weight_decay=0.01))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.7
    train, test = blobs(96), blobs(64, seed=1)
    model = digits_model()
    result = fit(model, train, cfg, validation=(test, np.arange(64)))
    assert result.train_accuracy >= 0.9
    assert result.val_accuracy == accuracy(model, test, np.arange(64)) >= 0.95


def test_until_train_accuracy_stops_early_and_respects_cap():
    train = blobs(96)
    result = fit(digits_model(), train, TrainConfig(epochs=40, lr=0.05, momentum=0.9, until_train_accuracy=0.9))
    accs = [h["train_accuracy"] for h in result.history]
    assert result.epochs < 40 and result.epochs == len(accs)
    assert accs[-1] >= 0.9 and all(a < 0.9 for a in accs[:-1]) and result.train_accuracy == accs[-1]
    # labels that cannot be learned in 3 epochs: the cap holds
    noise = ArrayDataset(train.x, torch.randint(0, 4, (96,), generator=torch.Generator().manual_seed(3)))
    capped = fit(digits_model(), noise, TrainConfig(epochs=3, until_train_accuracy=1.0))
    assert capped.epochs == 3 and capped.train_accuracy < 1.0


def test_schedule_hand_computed():
    # warm-up over 4 epochs to lr=0.1, then x0.5 at epochs 5 and 8
    cfg = TrainConfig(lr=0.1, warmup_epochs=4, milestones=[5, 8], gamma=0.5, epochs=10)
    expected = [0.025, 0.05, 0.075, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]
    opt = build_optimizer(nn.Linear(2, 2).parameters(), cfg)
    sched = build_scheduler(opt, cfg)
    got = []
    for _ in range(10):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # the FK MNIST protocol: 0.05, x0.1 at 15/30/45 (0-based epochs, torch MultiStepLR semantics)
    fk = TrainConfig(lr=0.05, milestones=[15, 30, 45], gamma=0.1, epochs=50)
    opt = build_optimizer(nn.Linear(2, 2).parameters(), fk)
    sched = build_scheduler(opt, fk)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose([lrs[i] for i in (0, 14, 15, 29, 30, 44, 45, 49)],
                               [0.05, 0.05, 0.005, 0.005, 5e-4, 5e-4, 5e-5, 5e-5], rtol=1e-9)  # fmt: skip
    # fit applies the same schedule, one step per epoch
    result = fit(digits_model(), blobs(8), cfg.model_copy(update={"batch_size": 8}))
    np.testing.assert_allclose([h["lr"] for h in result.history], expected, rtol=1e-12)


def _flip_problem(n: int = 40):
    """1-D feature x0 = +-1; validation labels follow x0 > 0, training labels the opposite."""
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    x = torch.randn(n, 1, 2, 2, generator=g) * 0.1
    x[:, 0, 0, 0] = sign * torch.linspace(0.2, 1.0, n)
    val_y = (sign > 0).long()
    return ArrayDataset(x, 1 - val_y), ArrayDataset(x, val_y)


def _threshold_model(threshold: float) -> nn.Module:
    """Logistic regression on x0 (4 pixels, only the first read): class 1 iff x0 > threshold."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, 0], model[1].weight[0, 0] = 1.0, -1.0
        model[1].bias[0], model[1].bias[1] = threshold, -threshold
    return model


def _flip_model() -> nn.Module:
    return _threshold_model(0.0)  # starts right on the validation set of _flip_problem


def test_select_by_validation_restores_best_epoch():
    """The boundary moves from x0 = 0.8 towards the training threshold -0.5, past the validation one (0):
    validation accuracy rises, peaks mid-training, then falls."""
    n = 40
    x = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 0.1
    x0 = torch.linspace(-1, 1, n)
    x[:, 0, 0, 0] = x0
    train, val = ArrayDataset(x, (x0 > -0.5).long()), ArrayDataset(x, (x0 > 0).long())
    cfg = TrainConfig(epochs=12, lr=0.1, momentum=0.0, batch_size=10, select_by="validation")
    model = _threshold_model(0.8)
    result = fit(model, train, cfg, validation=(val, np.arange(n)))
    accs = [h["val_accuracy"] for h in result.history]
    best = int(np.argmax(accs))  # first maximum
    assert 0 < best < len(accs) - 1 and accs[-1] < accs[best] and accs[0] < accs[best]
    assert result.selected_epoch == best + 1 and result.val_accuracy == max(accs) and result.epochs == 12
    assert accuracy(model, val, np.arange(n)) == max(accs)
    assert result.eval_seconds > 0
    # the restored weights are exactly those after `best + 1` epochs of the same run
    again = _threshold_model(0.8)
    last = fit(again, train, cfg.model_copy(update={"epochs": best + 1, "select_by": "last"}))
    assert last.selected_epoch == best + 1
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_select_by_validation_ties_keep_earliest_epoch():
    train, val = _flip_problem()
    cfg = TrainConfig(epochs=4, lr=1e-4, momentum=0.0, batch_size=10, select_by="validation")
    model = _flip_model()
    result = fit(model, train, cfg, validation=(val, np.arange(len(val))))
    assert [h["val_accuracy"] for h in result.history] == [1.0] * 4
    assert result.selected_epoch == 1 and result.epochs == 4
    again = _flip_model()
    fit(again, train, cfg.model_copy(update={"epochs": 1, "select_by": "last"}))
    assert torch.equal(model[1].weight, again[1].weight)


def test_select_by_last_keeps_last_and_reports_validation():
    train, val = _flip_problem()
    cfg = TrainConfig(epochs=8, lr=0.3, momentum=0.0, batch_size=10, select_by="last")
    model = _flip_model()
    result = fit(model, train, cfg, validation=(val, np.arange(len(val))))
    assert result.selected_epoch == 8
    assert result.val_accuracy == accuracy(model, val, np.arange(len(val))) < 1.0


def test_bad_inputs():
    data = blobs(8)
    with pytest.raises(ActivelabError, match="validation"):
        fit(digits_model(), data, TrainConfig(epochs=1, select_by="validation"))
    with pytest.raises(ActivelabError, match="no labeled samples"):
        TRAINER.fit(digits_model(), data, np.array([], np.int64), TrainConfig(), generator=torch.Generator())


def test_determinism_all_randomness_from_generator():
    data = blobs(48)
    cfg = TrainConfig(epochs=2, batch_size=10, augment="crop_flip")  # dropout + shuffling + augmentation
    states = []
    for seed in (0, 0, 1):
        model = digits_model(seed=7)
        torch.manual_seed(123)
        global_before = torch.random.get_rng_state()
        fit(model, data, cfg, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), global_before)  # global RNG left as it was
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


class _Recorder(nn.Module):
    """Records the first pixel of every training sample it sees; that pixel is the sample's index."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.batches: list[list[int]] = []

    def forward(self, x):
        if self.training:
            self.batches.append(x[:, 0, 0, 0].round().long().tolist())
        return self.fc(x.flatten(1))


def test_every_index_once_per_epoch_with_a_partial_last_batch():
    x = torch.zeros(20, 1, 2, 2)
    x[:, 0, 0, 0] = torch.arange(20).float()
    data = ArrayDataset(x, torch.arange(20) % 2)
    idx = np.array([3, 17, 5, 8, 11, 0, 19])
    model = _Recorder()
    result = TRAINER.fit(model, data, idx, TrainConfig(epochs=2, batch_size=3), generator=torch.Generator())
    assert result.epochs == 2
    assert [len(b) for b in model.batches] == [3, 3, 1, 3, 3, 1]
    epoch1, epoch2 = sum(model.batches[:3], []), sum(model.batches[3:], [])
    assert sorted(epoch1) == sorted(epoch2) == sorted(idx.tolist())
    # fewer samples than one batch
    model = _Recorder()
    TRAINER.fit(model, data, idx[:2], TrainConfig(epochs=1, batch_size=25), generator=torch.Generator())
    assert sorted(model.batches[0]) == [3, 17]


def test_generic_dataset_path_matches_array_fast_path():
    data = blobs(40)
    x = data.batch(np.arange(40))[0]
    fast = ArrayDataset(x, data.y)  # already normalised floats, identity normalisation
    generic = TensorDataset(x, data.y)
    cfg = TrainConfig(epochs=2, batch_size=16, augment="crop_flip")
    # without dropout: a DataLoader draws its base seed from the global torch RNG, which shifts dropout masks
    torch.manual_seed(0)
    a = build_model(ModelConfig(name="digits_cnn", dropout=False), 4, 1, 8)
    b = copy.deepcopy(a)
    fit(a, fast, cfg, seed=4)
    fit(b, generic, cfg, seed=4)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)
    np.testing.assert_array_equal(evaluate(a, generic, np.arange(40)), evaluate(a, fast, np.arange(40)))


def test_evaluate_matches_direct_argmax_and_restores_mode():
    data = blobs(30)
    model = digits_model().train()
    idx = np.array([4, 0, 29, 7])
    preds = evaluate(model, data, idx, batch_size=3)
    assert model.training
    with torch.no_grad():
        expected = model.eval()(data.batch(idx)[0]).argmax(1).numpy()
    np.testing.assert_array_equal(preds, expected)
    assert preds.dtype == np.int64


# -- augmentation ------------------------------------------------------------------------------------------
def _naive_crop(x: np.ndarray, dy: int, dx: int, pad: int, fill: np.ndarray) -> np.ndarray:
    c, h, w = x.shape
    padded = np.empty((c, h + 2 * pad, w + 2 * pad), x.dtype)
    for ch in range(c):
        padded[ch] = fill[ch]
        padded[ch, pad : pad + h, pad : pad + w] = x[ch]
    return padded[:, dy : dy + h, dx : dx + w]


def test_shift_crop_matches_naive_padding_and_slicing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 7, generator=g)
    offsets = torch.randint(0, 5, (6, 2), generator=g)
    fill = torch.tensor([0.5, -1.0, 2.0])
    out = shift_crop(x, offsets, 2, fill)
    assert out.shape == x.shape
    for i in range(6):
        dy, dx = offsets[i].tolist()
        np.testing.assert_allclose(out[i].numpy(), _naive_crop(x[i].numpy(), dy, dx, 2, fill.numpy()), atol=1e-6)
    torch.testing.assert_close(shift_crop(x, torch.full((6, 2), 2), 2), x)  # centre offset = identity


def test_random_crop_shifts_content_and_flip_flips():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 8, 8, generator=g)
    out = random_crop(x, 1, torch.Generator().manual_seed(2))
    shifted = 0
    for i in range(64):
        options = [_naive_crop(x[i].numpy(), dy, dx, 1, np.zeros(1)) for dy in range(3) for dx in range(3)]
        matches = [j for j, o in enumerate(options) if np.allclose(out[i].numpy(), o)]
        assert matches, "every crop is one of the 9 shifts"
        shifted += matches != [4]
    assert shifted > 40  # 8/9 of the crops move the content
    flipped = random_flip(x, torch.Generator().manual_seed(3))
    is_flip = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(64)]
    is_same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    assert all(a or b for a, b in zip(is_flip, is_same, strict=True))
    assert 16 < sum(is_flip) < 48
    torch.testing.assert_close(random_flip(x, torch.Generator().manual_seed(3)), flipped)


def test_augment_batch_kinds_and_padding():
    assert [crop_padding(s) for s in (8, 16, 28, 32, 224)] == [1, 2, 4, 4, 4]
    x = torch.randn(5, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert augment_batch(x, "none", g) is x
    for kind in ("crop", "crop_flip"):
        assert augment_batch(x, kind, g).shape == x.shape
    with pytest.raises(ActivelabError, match="crop_flip"):
        augment_batch(x, "rotate", g)
