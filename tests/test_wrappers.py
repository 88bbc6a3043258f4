"""Wrappers (subsample, class_balanced, stochastic), the shared engine, return_scores, plugins."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

import activelab
from activelab.errors import ActivelabError
from activelab.strategies.uncertainty import margin_scores
from activelab.strategies.wrappers import balanced_quotas, build_strategy, stochastic_sample

from .conftest import TinyNet, make_pool


def _model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def test_subsample_wrapper_is_the_subset_parameter():
    """One mechanism: gradnorm's own ``subset`` and the subsample wrapper draw the same subset and pick alike."""
    pool, labeled = make_pool(n=60), [59]
    a = activelab.select("gradnorm", _model(), pool, labeled=labeled, budget=4, subset=12, seed=3)
    b = activelab.select(
        "gradnorm", _model(), pool, labeled=labeled, budget=4, subset=None, seed=3, wrap=[("subsample", {"size": 12})]
    )
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ActivelabError, match="smaller than the budget"):
        activelab.select("margin", _model(), pool, labeled=labeled, budget=4, wrap=[("subsample", {"size": 3})])


def test_balanced_quotas_hand_worked():
    # labeled 5 / 0 / 2: the labels go to class 1 until it ties class 2, then alternate (ties: lowest class)
    np.testing.assert_array_equal(balanced_quotas([5, 0, 2], [10, 10, 10], 6), [0, 4, 2])
    # class 1 has one candidate only: it gets 1, class 2 rises to 5, then classes 0 and 2 alternate
    np.testing.assert_array_equal(balanced_quotas([5, 0, 2], [10, 1, 10], 6), [1, 1, 4])
    # a class with no predicted candidate gets nothing; its share moves to the others
    np.testing.assert_array_equal(balanced_quotas([0, 0, 0], [3, 0, 3], 4), [2, 0, 2])
    with pytest.raises(ActivelabError, match="only 2 candidates"):
        balanced_quotas([0, 0], [1, 1], 3)


def test_class_balanced_runs_the_base_inside_each_predicted_class():
    """Against an independent computation: quotas from the labeled histogram, then the top margins among the
    candidates predicted in each class."""
    pool, labeled = make_pool(n=80), np.arange(0, 80, 8)
    model = _model()
    out = activelab.select("margin", model, pool, labeled=labeled, budget=8, seed=0, wrap=["class_balanced"])
    unl = np.setdiff1d(np.arange(80), labeled)
    x, _ = pool.batch(unl)
    with torch.no_grad():
        probs = torch.softmax(model.eval()(x).double(), 1).numpy()
    pred = probs.argmax(1)
    quotas = balanced_quotas(np.bincount(pool.targets[labeled], minlength=4), np.bincount(pred, minlength=4), 8)
    expected = []
    scores = margin_scores(probs)
    for k in range(4):
        members = np.flatnonzero(pred == k)
        expected += unl[members[np.argsort(-scores[members], kind="stable")[: quotas[k]]]].tolist()
    assert sorted(out.tolist()) == sorted(expected)
    assert len(set(out.tolist())) == 8


def test_stochastic_sampling_follows_the_weights():
    rng = np.random.default_rng(0)
    scores = np.array([0.0, 1.0, 2.0, 7.0])
    first = np.bincount([stochastic_sample(scores, 1, rng)[0] for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(first, scores / scores.sum(), atol=0.03)  # power, T = 1: p proportional to s
    soft = np.bincount([stochastic_sample(scores, 1, rng, "softmax")[0] for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(soft, np.exp(scores) / np.exp(scores).sum(), atol=0.03)
    # all-zero scores: a uniform draw, still distinct positions
    zeros = [tuple(sorted(stochastic_sample(np.zeros(5), 2, rng))) for _ in range(2000)]
    assert len(set(zeros)) == 10 and all(len(set(z)) == 2 for z in zeros)
    # more picks than positive scores: every positive one first, then zeros
    picks = stochastic_sample(np.array([0.0, 0.0, 3.0, 0.0]), 3, rng)
    assert picks[0] == 2 and len(set(picks.tolist())) == 3
    with pytest.raises(ActivelabError, match="softmax"):
        stochastic_sample(np.array([-1.0, 0.5]), 1, rng)
    # low temperature is greedy
    np.testing.assert_array_equal(stochastic_sample(scores, 2, rng, "rank", temperature=1e-3), [3, 2])


def test_stochastic_needs_a_scoring_strategy_and_margin_needs_softmax_or_rank():
    with pytest.raises(ActivelabError, match="scoring strategy"):
        build_strategy("badge", {}, ["stochastic"])
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    with pytest.raises(ActivelabError, match="rank"):
        activelab.select("margin", _model(), pool, labeled=labeled, budget=3, wrap=["stochastic"])
    a = activelab.select("margin", _model(), pool, labeled=labeled, budget=5, wrap=[("stochastic", {"mode": "rank"})])
    assert len(set(a.tolist())) == 5
    with pytest.raises(ActivelabError, match="unknown wrapper"):
        build_strategy("margin", {}, ["no_such_wrapper"])


def test_return_scores_gives_scores_by_pool_index():
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    model = _model()
    idx, scores = activelab.select("margin", model, pool, labeled=labeled, budget=4, return_scores=True)
    assert scores.shape == (60,) and np.all(np.isnan(scores[labeled]))
    unl = np.setdiff1d(np.arange(60), labeled)
    x, _ = pool.batch(unl)
    with torch.no_grad():
        expected = margin_scores(torch.softmax(model.eval()(x).double(), 1).numpy())
    np.testing.assert_allclose(scores[unl], expected, atol=1e-12)
    assert scores[idx].min() >= np.sort(expected)[-4] - 1e-12
    _, none = activelab.select("badge", model, pool, labeled=labeled, budget=4, return_scores=True)
    assert none is None


def test_select_accepts_a_boolean_mask_and_rejects_floats_and_duplicates():
    pool = make_pool()
    mask = np.zeros(60, dtype=bool)
    mask[[3, 7]] = True
    out = activelab.select("random", _model(), pool, labeled=mask, budget=58)
    assert not {3, 7} & set(out.tolist())
    with pytest.raises(ActivelabError, match="boolean mask"):
        activelab.select("random", _model(), pool, labeled=np.zeros(5, dtype=bool), budget=2)
    with pytest.raises(ActivelabError, match="integer pool indices"):
        activelab.select("random", _model(), pool, labeled=[1.5, 2.0], budget=2)
    with pytest.raises(ActivelabError, match="repeated"):
        activelab.select("random", _model(), pool, labeled=[1, 1], budget=2)


def test_select_restores_the_cuda_generator_too():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    model = _model().cuda()
    torch.cuda.manual_seed_all(5)
    before = torch.cuda.get_rng_state_all()
    activelab.select("var_ratio", model, make_pool(), labeled=[0], budget=3, device="cuda", mc_samples=2)
    assert all(torch.equal(a, b) for a, b in zip(before, torch.cuda.get_rng_state_all(), strict=True))


PLUGIN = '''
import numpy as np
from torch import nn
from activelab.strategies.base import ScoreStrategy
from activelab.data.arrays import ArrayDataset
import torch


class LowestIndex(ScoreStrategy):
    """Picks the lowest pool indices first (a strategy of one's own)."""

    name = "lowest_index"

    def scores(self, ctx, rng):
        return -ctx.candidates.astype(float)


def tiny_mlp(num_classes, in_channels=1, image_size=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 16), nn.ReLU(),
                         nn.Linear(16, num_classes))


def blobs(split, root=None):
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 300 if split == "train" else 100
    y = torch.arange(n) % 3
    x = (torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1)).float()
    return ArrayDataset(x, y, classes=["a", "b", "c"], name="blobs")
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    yield "my_plugins"
    sys.modules.pop("my_plugins", None)


def test_a_plugin_strategy_works_in_select(plugin_module):
    out = activelab.select(f"{plugin_module}:LowestIndex", _model(), make_pool(), labeled=[0, 1], budget=3)
    np.testing.assert_array_equal(out, [2, 3, 4])
    with pytest.raises(ActivelabError, match="no attribute"):
        activelab.select(f"{plugin_module}:Nope", _model(), make_pool(), budget=3)
    with pytest.raises(ActivelabError, match="cannot import"):
        activelab.select("no_such_module_xyz:Thing", _model(), make_pool(), budget=3)


def test_plugin_strategy_model_and_dataset_in_an_experiment_with_two_workers(plugin_module, tmp_path):
    from activelab.experiment.runner import load_experiment, run_experiment

    cfg = {
        "name": "plugins",
        "dataset": {"name": f"{plugin_module}:blobs"},
        "model": {"name": f"{plugin_module}:tiny_mlp"},
        "train": {"optimizer": "adam", "lr": 0.01, "batch_size": 16, "epochs": 2},
        "loop": {"initial": 6, "budget": 6, "rounds": 2, "runs": 1, "seed": 0},
        "threads": 1,
        "strategies": [
            {"name": f"{plugin_module}:LowestIndex"},
            {"name": "margin", "wrap": [{"name": "class_balanced"}]},
        ],
    }
    path = tmp_path / "plugins.yaml"
    path.write_text(yaml.safe_dump(cfg))
    outcome = run_experiment(path, tmp_path / "exp", workers=2, progress=False)
    assert not outcome.failed, outcome.failed
    _, store = load_experiment(tmp_path / "exp")
    labels = {r.strategy for r in store.rounds()}
    assert labels == {f"{plugin_module}:LowestIndex", "class_balanced(margin)"}
    store.close()


def test_labels_of_a_subset_are_read_without_decoding_images():
    """An image-folder-like dataset under a torch Subset: its labels come from ``targets``, no image is loaded."""
    from activelab.data.arrays import dataset_labels

    class Folder(torch.utils.data.Dataset):
        targets = [0, 1, 2, 1, 0, 2]

        def __len__(self):
            return 6

        def __getitem__(self, i):
            raise AssertionError("an image was decoded just to read a label")

    sub = torch.utils.data.Subset(Folder(), [5, 1, 3])
    np.testing.assert_array_equal(dataset_labels(sub), [2, 1, 1])


def test_select_checks_the_model_and_dataset_contracts_on_two_samples():
    """A model without (B, C) float logits, or a dataset without (x, y) items, is named before any strategy
    work (gradnorm used to score malformed outputs)."""

    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1).sum(dim=1)  # (B,), not (B, C)

    class OnlyX(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.zeros(1, 8, 8)

    with pytest.raises(ActivelabError, match=r"returned shape \(2,\)"):
        activelab.select("gradnorm", Flat(), make_pool(), labeled=[0], budget=2)
    with pytest.raises(ActivelabError, match="item 0"):
        activelab.select("margin", _model(), OnlyX(), budget=2)


def test_size_limits_see_what_the_wrappers_hand_down():
    from activelab.errors import ActivelabError
    from activelab.strategies.wrappers import build_strategy

    limited = {"max_candidates": 100}
    build_strategy("batchbald", limited, [("subsample", {"size": 50})]).sized_check(1000, 10, 4, 5)
    build_strategy("batchbald", {**limited, "subset": 80}).sized_check(1000, 10, 4, 5)
    for wrap in ([], ["class_balanced"], [("subsample", {"size": 500})]):
        with pytest.raises(ActivelabError, match="batchbald over N="):
            build_strategy("batchbald", limited, wrap).sized_check(1000, 10, 4, 5)
    with pytest.raises(ActivelabError, match="probcover over N=1,010 labeled"):
        build_strategy("probcover", {"max_points": 100}, ["class_balanced"]).sized_check(1000, 10, 4, 5)
