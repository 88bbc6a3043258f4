"""Training for imbalance (class weights, prior correction) and the imbalance data options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from activelab.config import TrainConfig
from activelab.data.imbalance import clip_classes, symmetric_noise
from activelab.errors import ActivelabError
from activelab.train.supervised import StandardTrainer, evaluate, inverse_frequency_weights, prior_offset

from .conftest import TinyNet, make_pool


def test_inverse_frequency_weights_and_weighted_loss():
    y = np.array([0, 0, 0, 1, 2, 2])
    w = inverse_frequency_weights(y, 4)
    np.testing.assert_allclose(w, [6 / 9, 6 / 3, 6 / 6, 0])
    trainer = StandardTrainer()
    trainer._class_weight = torch.tensor(w, dtype=torch.float32)
    logits = torch.randn(6, 4)
    yt = torch.as_tensor(y)
    want = sum(w[y[i]] * F.cross_entropy(logits[i : i + 1], yt[i : i + 1]) for i in range(6)) / w[y].sum()
    assert trainer.classification_loss(logits, yt).item() == pytest.approx(want.item(), rel=1e-5)


def test_class_weights_change_training_and_default_is_unchanged():
    pool = make_pool(40)
    idx = np.concatenate([np.flatnonzero(pool.targets == 0), np.flatnonzero(pool.targets == 1)[:2]])
    out = {}
    for mode in ("none", "inverse_frequency"):
        torch.manual_seed(0)
        model = TinyNet()
        cfg = TrainConfig(epochs=3, batch_size=4, class_weights=mode)
        StandardTrainer().fit(model, pool, idx, cfg, generator=torch.Generator().manual_seed(0))
        out[mode] = torch.cat([p.flatten() for p in model.parameters()])
    assert not torch.allclose(out["none"], out["inverse_frequency"])


def test_prior_correction_subtracts_the_log_prior():
    pool = make_pool(20)
    torch.manual_seed(0)
    model = TinyNet()
    offset = prior_offset(np.array([0] * 30 + [1]), 4)
    np.testing.assert_allclose(np.exp(offset), np.array([31, 2, 1, 1]) / 35)
    with torch.no_grad():
        logits = model(pool.batch(np.arange(20))[0]).numpy()
    got = evaluate(model, pool, np.arange(20), logit_offset=offset)
    np.testing.assert_array_equal(got, (logits - offset).argmax(1))


def test_clip_classes_merges_the_rest():
    pool = make_pool(40, num_classes=4)
    clipped = clip_classes(pool, 3)
    np.testing.assert_array_equal(clipped.targets, np.minimum(pool.targets, 2))
    assert clipped.num_classes == 3 and clipped.classes[-1] == "other"
    with pytest.raises(ActivelabError, match="only 4 classes"):
        clip_classes(pool, 5)


def test_symmetric_noise_flips_the_fraction_to_other_classes():
    y = np.repeat(np.arange(5), 200)
    noisy = symmetric_noise(y, 0.2, 5, np.random.default_rng(0))
    assert (noisy != y).sum() == 200
    assert np.all((noisy >= 0) & (noisy < 5))
    flipped_to = noisy[noisy != y]
    assert np.bincount(flipped_to, minlength=5).min() > 20  # spread over all classes
    np.testing.assert_array_equal(symmetric_noise(y, 0.0, 5, np.random.default_rng(0)), y)


def test_clip_and_noise_in_a_run():
    from activelab.config import parse_config
    from activelab.data.arrays import dataset_labels
    from activelab.experiment.setup import load_data, prepare_run

    base = {
        "name": "t",
        "dataset": {"name": "digits", "clip_to": 3},
        "bias": {"label_noise": 0.1},
        "model": {"name": "digits_cnn"},
        "loop": {"initial": 10, "budget": 5, "rounds": 1},
        "strategies": [{"name": "random"}],
    }
    cfg = parse_config(base)
    data = prepare_run(cfg, 0)
    assert data.num_classes == 3
    train, test = load_data(cfg.dataset)
    assert set(dataset_labels(test).tolist()) == {0, 1, 2}
    clean = dataset_labels(train)[data.pool_indices]
    noisy = dataset_labels(data.pool)
    assert (noisy != clean).sum() == round(0.1 * len(clean))
    clean_cfg = parse_config({**base, "bias": {}})
    assert cfg.fingerprint() != clean_cfg.fingerprint()
