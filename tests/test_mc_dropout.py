"""MC-dropout scores against closed forms, and the streamed sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import activelab
from activelab.errors import ActivelabError
from activelab.inference.mc import MCStatistics, mc_statistics
from activelab.query.context import QueryContext
from activelab.strategies.base import get_strategy
from activelab.strategies.mc_dropout import bald, mean_entropy_score, mean_std, variation_ratio

from .conftest import TinyNet, make_pool


def _samples(seed=0, n=7, t=9, c=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, t, c)) * 2
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


def test_scores_equal_closed_forms_on_hand_made_samples():
    p = _samples()
    stats = MCStatistics.from_samples(p)
    n, t, c = p.shape
    votes = np.stack([np.bincount(p[i].argmax(1), minlength=c) for i in range(n)])
    np.testing.assert_allclose(variation_ratio(stats), 1 - votes.max(1) / t)
    mean = p.mean(1)
    h_mean = -(mean * np.log(mean)).sum(1)
    np.testing.assert_allclose(mean_entropy_score(stats), h_mean, rtol=1e-10)
    mean_h = -(p * np.log(p)).sum(2).mean(1)
    np.testing.assert_allclose(bald(stats), h_mean - mean_h, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mean_std(stats), p.std(axis=1, ddof=1).mean(1), rtol=1e-7)


def test_hand_worked_variation_ratio_and_bald():
    # 4 passes, 2 classes: votes 3:1 -> var ratio 0.25; identical passes -> BALD 0
    p = np.array([[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]], [[0.5, 0.5]] * 4])
    stats = MCStatistics.from_samples(p)
    np.testing.assert_allclose(variation_ratio(stats), [0.25, 0.0])
    assert bald(stats)[1] == pytest.approx(0.0, abs=1e-12) and bald(stats)[0] > 0
    assert mean_entropy_score(stats)[1] == pytest.approx(np.log(2))


def test_streamed_accumulation_equals_one_shot():
    p = _samples(1, n=5, t=6)
    s = MCStatistics.empty(5, 4)
    s.add(slice(0, 5), np.transpose(p[:, :2], (1, 0, 2)))
    s.add(np.arange(5), np.transpose(p[:, 2:], (1, 0, 2)))
    s.passes = 6
    ref = MCStatistics.from_samples(p)
    for f in (variation_ratio, bald, mean_entropy_score, mean_std):
        np.testing.assert_allclose(f(s), f(ref))


class NoDropNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.0)


def test_sampler_without_active_dropout_gives_the_deterministic_prediction():
    torch.manual_seed(0)
    model, pool = NoDropNet(), make_pool(20)
    stats = mc_statistics([model], pool, np.arange(20), 5, seed=0, batch_size=8, max_rows=16)
    with torch.no_grad():
        model.eval()
        probs = torch.softmax(model(pool.batch(np.arange(20))[0]).double(), 1).numpy()
    assert stats.passes == 5
    np.testing.assert_array_equal(stats.counts.argmax(1), probs.argmax(1))
    np.testing.assert_array_equal(stats.counts.max(1), 5)
    np.testing.assert_allclose(stats.prob_sum / 5, probs, rtol=1e-6)
    np.testing.assert_allclose(variation_ratio(stats), 0.0)
    np.testing.assert_allclose(bald(stats), 0.0, atol=1e-9)


def test_sampler_is_seeded_blocked_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    model, pool = TinyNet(), make_pool(20)
    state = torch.random.get_rng_state()
    a = mc_statistics([model], pool, np.arange(20), 8, seed=3, batch_size=8, max_rows=16)
    assert torch.equal(state, torch.random.get_rng_state())
    b = mc_statistics([model], pool, np.arange(20), 8, seed=3, batch_size=8, max_rows=16)
    c = mc_statistics([model], pool, np.arange(20), 8, seed=4, batch_size=8, max_rows=16)
    np.testing.assert_array_equal(a.prob_sum, b.prob_sum)
    assert not np.array_equal(a.prob_sum, c.prob_sum)  # dropout is on: passes differ
    assert a.counts.sum() == 20 * 8 and np.all(a.counts.sum(1) == 8)
    assert model.training  # mode restored
    two = mc_statistics([model, model], pool, np.arange(20), 4, seed=3, batch_size=8)
    assert two.passes == 8 and np.all(two.counts.sum(1) == 8)


def test_model_without_dropout_is_an_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(ActivelabError, match="Dropout"):
        mc_statistics([model], make_pool(4), np.arange(4), 3, seed=0)


def test_strategies_rank_by_their_scores():
    torch.manual_seed(0)
    model, pool = TinyNet(), make_pool(30)
    for name, fn in [("var_ratio", variation_ratio), ("bald", bald), ("mc_entropy", mean_entropy_score),
                     ("mean_std", mean_std)]:  # fmt: skip
        # one labeled sample: with none the first round is random (first_round_random)
        out = activelab.select(name, model, pool, labeled=[29], budget=5, seed=1, mc_samples=6)
        rng = np.random.default_rng(1)
        rng.integers(2**31)  # select() draws the torch seed first
        stats = mc_statistics([model], pool, np.arange(29), 6, seed=int(rng.integers(2**31 - 1)))
        scores = fn(stats)
        assert scores[out].min() >= np.sort(scores)[-5] - 1e-12
        assert np.ptp(scores) > 0
        assert get_strategy(name).first_round_random


def test_ensemble_members_from_the_runner_are_used():
    torch.manual_seed(0)
    pool = make_pool(20)
    members = [TinyNet(), TinyNet()]
    ctx = QueryContext(TinyNet(), pool, np.arange(20), np.array([], dtype=np.int64))
    ctx.ensemble_models = members
    strategy = get_strategy("var_ratio")(mc_samples=3, ensemble=2)
    out = strategy.query(ctx, 4, np.random.default_rng(0))
    assert len(set(out.tolist())) == 4
    seed = int(np.random.default_rng(0).integers(2**31 - 1))
    expected = mc_statistics(members, pool, np.arange(20), 3, seed)
    np.testing.assert_array_equal(ctx.mc_statistics(3, 2, seed).counts, expected.counts)
    ctx.ensemble_models = members[:1]
    ctx2 = QueryContext(TinyNet(), pool, np.arange(20), np.array([], dtype=np.int64))
    ctx2.ensemble_models = members[:1]
    with pytest.raises(ActivelabError, match="ensemble=2"):
        strategy.query(ctx2, 4, np.random.default_rng(0))
