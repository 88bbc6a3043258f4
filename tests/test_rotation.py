"""Rotation self-supervised pretraining on digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from activelab.config import PretrainConfig
from activelab.data.arrays import ArrayDataset
from activelab.errors import ActivelabError
from activelab.models import DigitsCNN
from activelab.train.rotation import rotate_batch, rotation_pretrain


def digits(n=600) -> ArrayDataset:
    d = load_digits()
    x = torch.tensor(d.images[:n] * (255 / 16), dtype=torch.float32).round().to(torch.uint8)
    return ArrayDataset(x, d.target[:n], mean=[0.3], std=[0.4])


def test_rotate_batch_blocks_and_labels():
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    xr, y = rotate_batch(x)
    assert xr.shape == (8, 1, 3, 3) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(xr[:2], x)
    assert torch.equal(xr[2:4], torch.rot90(x, 1, (2, 3)))
    assert torch.equal(xr[4:6], torch.flip(x, (2, 3)))  # 180 degrees
    assert torch.equal(torch.rot90(xr[6:8], 1, (2, 3)), x)  # 270 + 90 = 360
    with pytest.raises(ActivelabError, match="square"):
        rotate_batch(torch.zeros(1, 1, 3, 4))


def test_rotation_pretraining_learns_rotations_and_restores_the_head():
    torch.manual_seed(0)
    model = DigitsCNN(10, 1, 8)
    before = copy.deepcopy(model.state_dict())
    pool = digits()
    cfg = PretrainConfig(epochs=4, lr=0.1, momentum=0.9, batch_size=25, milestones=[3])
    state = torch.random.get_rng_state()
    stats = rotation_pretrain(model, pool, np.arange(600), cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.random.get_rng_state())
    assert stats["epochs"] == 4 and len(stats["history"]) == 4
    assert [h["lr"] for h in stats["history"]] == pytest.approx([0.1, 0.1, 0.1, 0.01])
    assert stats["history"][0]["rotation_accuracy"] < stats["rotation_accuracy"]
    assert stats["rotation_accuracy"] > 0.7  # chance is 0.25
    # a fresh 10-way head; the backbone changed
    assert model.fc2.out_features == 10 and model.fc2.in_features == 64
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])
    assert not torch.equal(model.fc1.weight, before["fc1.weight"])
    assert model(pool.batch(np.arange(4))[0]).shape == (4, 10)
    # same generator -> same result
    torch.manual_seed(0)
    again = DigitsCNN(10, 1, 8)
    rotation_pretrain(again, pool, np.arange(600), cfg, generator=torch.Generator().manual_seed(0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_empty_pool_is_an_error():
    with pytest.raises(ActivelabError, match="non-empty"):
        rotation_pretrain(DigitsCNN(), digits(10), np.array([], np.int64), PretrainConfig(),
                          generator=torch.Generator())  # fmt: skip
