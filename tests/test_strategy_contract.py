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


# -- invariants users rely on, for every registered strategy and for wrapped ones ---------------------------------

WRAPPED = [("margin", ["class_balanced"]), ("badge", [("subsample", {"size": 30})]), ("entropy", ["stochastic"])]
CASES = [(name, []) for name in STRATEGIES] + WRAPPED
IDS = [name if not wrap else f"{wrap}({name})" for name, wrap in CASES]


def _select_case(name, wrap, model, pool, labeled, budget, seed=0, **extra):
    params = {**get_strategy(name).example_params, **extra}
    if get_strategy(name).uses_oracle:  # in-round oracle strategies get one, answering from the pool's labels
        from activelab.data.arrays import dataset_labels

        truth = dataset_labels(pool)
        params["oracle"] = lambda idx: truth[idx]
    return activelab.select(
        name, model, pool, labeled=labeled, budget=budget, validation=make_pool(24, seed=1), seed=seed,
        wrap=wrap, **params,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "wrap"), CASES, ids=IDS)
def test_works_with_no_labels(name, wrap):
    out = _select_case(name, wrap, _prepared_model(name), make_pool(), [], budget=5)
    assert out.shape == (5,) and len(set(out.tolist())) == 5


@pytest.mark.parametrize(("name", "wrap"), CASES, ids=IDS)
def test_leaves_the_model_and_the_global_rng_as_they_were(name, wrap):
    """Weights, train/eval mode of every module and requires_grad of every parameter are unchanged, and so is
    the global torch RNG state (CPU, and CUDA where present)."""
    model = _prepared_model(name)
    model.train()
    model.conv1.eval()
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(123)
    cpu_state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    _select_case(name, wrap, model, make_pool(), np.arange(0, 60, 5), budget=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert torch.equal(torch.random.get_rng_state(), cpu_state)
    if cuda_state is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_state, strict=True))


class PlainDataset(torch.utils.data.Dataset):
    """A dataset with only __len__ and __getitem__ (no batch(), no targets): what users often pass."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


@pytest.mark.parametrize(("name", "wrap"), CASES, ids=IDS)
def test_accepts_a_plain_torch_dataset(name, wrap):
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    a = _select_case(name, wrap, _prepared_model(name), pool, labeled, budget=5, seed=2)
    b = _select_case(name, wrap, _prepared_model(name), PlainDataset(pool), labeled, budget=5, seed=2)
    np.testing.assert_array_equal(a, b)


class CountingNet(TinyNet):
    """TinyNet that counts how often each pool image goes through forward (images are told apart by content)."""

    def __init__(self, pool) -> None:
        super().__init__()
        self.lookup = {pool[i][0].numpy().tobytes(): i for i in range(len(pool))}
        self.seen = np.zeros(len(pool), dtype=np.int64)

    def forward(self, x):
        from activelab.data.contract import checking

        if checking.get():  # select's two-sample contract probe is not a pass over the pool
            return super().forward(x)
        try:
            rows = [row.numpy().tobytes() for row in x.detach()]
        except RuntimeError:  # inside vmap (per-sample gradients): not a plain forward pass
            rows = []
        for row in rows:
            i = self.lookup.get(row)
            if i is not None:
                self.seen[i] += 1
        return super().forward(x)


# strategies whose whole query is plain forward passes: each candidate (and each labeled sample they read) must go
# through the model exactly once, whatever they read (probabilities and embeddings come from one pass)
ONE_PASS = {"margin", "entropy", "least_confidence", "badge", "bait", "coreset", "kcenter"}


@pytest.mark.parametrize(("name", "wrap"), CASES, ids=IDS)
def test_makes_the_minimal_number_of_forward_passes(name, wrap):
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    torch.manual_seed(0)
    model = CountingNet(pool)
    training = get_strategy(name).training
    if training != "standard":
        from activelab.train import get_trainer

        get_trainer(training).prepare(model)
    extra = {"subset": None} if name in ("bait", "coreset", "kcenter") else {}
    out = _select_case(name, wrap, model, pool, labeled, budget=5, **extra)
    unlabeled = np.setdiff1d(np.arange(60), labeled)
    if name == "random":
        assert model.seen.sum() == 0
    elif name in ONE_PASS and not wrap:
        assert np.all(model.seen[unlabeled] == 1), model.seen[unlabeled]
        reads_labeled = name in ("bait", "coreset", "kcenter")
        assert np.all(model.seen[labeled] == (1 if reads_labeled else 0))
    elif wrap == [("subsample", {"size": 30})]:
        assert model.seen[unlabeled].sum() == 30 and model.seen.max() == 1  # only the subset is embedded, once
    elif name in ("var_ratio", "bald", "mc_entropy", "mean_std"):
        k = get_strategy(name).example_params["mc_samples"]
        assert np.all(model.seen[unlabeled] == k) and np.all(model.seen[labeled] == 0)
    elif wrap:  # class_balanced / stochastic around a one-pass strategy: still one pass
        assert np.all(model.seen[unlabeled] == 1)
    assert len(out) == 5


def test_strategy_modules_never_import_inference_or_training_code():
    """The query context is the only door to the model: no strategy module imports activelab.inference or
    activelab.train, at module level or inside a function."""
    import ast
    from pathlib import Path

    import activelab.strategies as pkg

    offenders = []
    for path in Path(pkg.__path__[0]).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                if module.lstrip(".").split(".")[0] in ("inference", "train") and node.level >= 2:
                    offenders.append(f"{path.name}: from {module}")
                if (node.module or "").startswith(("activelab.inference", "activelab.train")):
                    offenders.append(f"{path.name}: from {node.module}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith(
                    ("activelab.inference", "activelab.train"))]  # fmt: skip
    assert not offenders, offenders
