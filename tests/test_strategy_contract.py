"""The contract every registered strategy inherits (one test set, parametrised over the registry)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import activelab
from activelab.errors import ActivelabError
from activelab.strategies.base import get_strategy

from .conftest import TinyNet, make_pool

STRATEGIES = activelab.available_strategies()


def _prepared_model(name: str) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    training = get_strategy(name).training
    if training != "standard":
        from activelab.train import get_trainer

        get_trainer(training).prepare(model)
    return model


def _select(name, model, pool, labeled, budget, seed=0, oracle_labels=None, **extra):
    cls = get_strategy(name)
    params = {**cls.example_params, **extra}
    if cls.uses_oracle:  # in-round oracle strategies get one (answering from ``oracle_labels``, default the pool's)
        truth = np.asarray(pool.targets if oracle_labels is None else oracle_labels)
        params["oracle"] = lambda idx: truth[idx]
    return activelab.select(
        name, model, pool, labeled=labeled, budget=budget, validation=make_pool(24, seed=1), seed=seed, **params
    )


@pytest.mark.parametrize("name", STRATEGIES)
def test_returns_budget_unique_unlabeled(name):
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    out = _select(name, _prepared_model(name), pool, labeled, budget=7)
    assert out.dtype == np.int64 and out.shape == (7,)
    assert len(set(out.tolist())) == 7
    assert not set(out.tolist()) & set(labeled.tolist())
    assert out.min() >= 0 and out.max() < len(pool)


@pytest.mark.parametrize("name", STRATEGIES)
def test_same_seed_same_indices(name):
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    a = _select(name, _prepared_model(name), pool, labeled, budget=6, seed=3)
    b = _select(name, _prepared_model(name), pool, labeled, budget=6, seed=3)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", STRATEGIES)
def test_budget_larger_than_unlabeled_pool_is_an_error(name):
    pool, labeled = make_pool(), np.arange(0, 60, 2)
    with pytest.raises(ActivelabError, match="larger than the unlabeled pool"):
        _select(name, _prepared_model(name), pool, labeled, budget=31)


@pytest.mark.parametrize("name", STRATEGIES)
def test_unknown_parameter_is_an_error(name):
    with pytest.raises(ActivelabError, match="Valid parameters"):
        _select(name, _prepared_model(name), make_pool(), [], budget=3, no_such_parameter=1)


@pytest.mark.parametrize("name", STRATEGIES)
def test_permuting_pool_labels_changes_nothing_unless_oracle(name):
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    # the labeled set's labels are known; the unlabeled pool's are permuted (the oracle still answers truly)
    targets = pool.targets.copy()
    unlabeled = np.setdiff1d(np.arange(len(pool)), labeled)
    targets[unlabeled] = np.random.default_rng(1).permutation(targets[unlabeled])
    permuted = pool.with_labels(targets)
    model = _prepared_model(name)
    a = _select(name, copy.deepcopy(model), pool, labeled, budget=6)
    b = _select(name, copy.deepcopy(model), permuted, labeled, budget=6, oracle_labels=pool.targets)
    instance = get_strategy(name)(**get_strategy(name).example_params)
    if not instance.reads_pool_labels:  # only oracle ablations may read pool labels
        np.testing.assert_array_equal(a, b)


def test_unknown_strategy_lists_available():
    with pytest.raises(ActivelabError, match="available: .*entropy"):
        activelab.select("no_such", TinyNet(), make_pool(), budget=2)


def test_labeled_out_of_range_is_an_error():
    with pytest.raises(ActivelabError, match="labeled indices"):
        activelab.select("random", TinyNet(), make_pool(), labeled=[100], budget=2)
