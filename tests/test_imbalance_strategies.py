"""The imbalance strategies through activelab.select: the in-round oracle's accounting and refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import activelab
from activelab.errors import ActivelabError

from .conftest import TinyNet, make_pool


def _model():
    torch.manual_seed(0)
    return TinyNet()


@pytest.mark.parametrize("name", ["galaxy", "direct"])
def test_without_an_oracle_the_oracle_strategies_refuse(name):
    with pytest.raises(ActivelabError, match="oracle"):
        activelab.select(name, _model(), make_pool(), labeled=np.arange(0, 60, 5), budget=5)


@pytest.mark.parametrize("name,params", [("galaxy", {}), ("direct", {"b1": 3}), ("galaxy", {"class_choice": "random"})])
def test_budget_spent_equals_points_asked_and_unasked_labels_are_never_read(name, params):
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    truth = pool.targets.copy()
    calls = []

    def oracle(idx):
        calls.append(np.asarray(idx).copy())
        return truth[idx]

    picks = activelab.select(name, _model(), pool, labeled=labeled, budget=9, oracle=oracle, **params)
    asked = np.concatenate(calls)
    np.testing.assert_array_equal(np.sort(asked), np.sort(picks))  # every pick asked once, nothing else
    if name == "direct":
        assert max(len(c) for c in calls) <= 3
    else:
        assert len(calls) == 9  # GALAXY is sequential: one label per query
    # the unasked labels (and the pool's stored labels) can change without changing the picks
    other = truth.copy()
    unasked = np.setdiff1d(np.setdiff1d(np.arange(60), labeled), picks)
    other[unasked] = np.random.default_rng(3).permutation(other[unasked])
    again = activelab.select(
        name, _model(), pool.with_labels(other), labeled=labeled, budget=9, oracle=lambda i: other[i], **params
    )
    np.testing.assert_array_equal(picks, again)


def test_class_balanced_wraps_the_new_strategies():
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    for name in ("base", "similar", "bengar"):
        out = activelab.select(
            name, _model(), pool, labeled=labeled, budget=6, wrap=["class_balanced"], validation=make_pool(24, seed=1)
        )
        assert len(set(out.tolist())) == 6 and not set(out.tolist()) & set(labeled.tolist())


def test_similar_query_set_comes_from_the_rare_classes():
    from activelab.query.context import QueryContext
    from activelab.strategies.similar import Similar

    pool = make_pool()
    labeled = np.array([0, 4, 8, 12, 16, 1, 5, 2])  # class 0: 5, class 1: 2, class 2: 1, class 3: 0
    ctx = QueryContext(
        _model(), pool, np.setdiff1d(np.arange(60), labeled), labeled, make_pool(24, seed=1), outputs=("probs",)
    )
    Similar().query(ctx, 4, np.random.default_rng(0))
    # below the uniform share 1/4 of 8 labels (2): classes 2 and 3; Q = their 12 validation images + 1 labeled one
    assert ctx.info["similar_rare_classes"] == [2, 3]
    assert ctx.info["similar_query_size"] == 2 * 6 + 1
    ctx2 = QueryContext(
        _model(), pool, np.setdiff1d(np.arange(60), labeled), labeled, make_pool(24, seed=1), outputs=("probs",)
    )
    Similar(rare_classes=[1]).query(ctx2, 4, np.random.default_rng(0))
    assert ctx2.info["similar_rare_classes"] == [1] and ctx2.info["similar_query_size"] == 6 + 2


def test_experiment_records_oracle_use_and_reports_imbalance_metrics(tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from activelab.cli import main
    from activelab.experiment.runner import load_experiment, run_experiment

    cfg = {
        "name": "imb",
        "dataset": {"name": "digits", "clip_to": 3},
        "validation": {"per_class": 3},
        "model": {"name": "digits_cnn"},
        "train": {"optimizer": "adam", "lr": 0.003, "epochs": 1, "class_weights": "inverse_frequency"},
        "loop": {"initial": 12, "budget": 6, "rounds": 1, "runs": 1, "seed": 1},
        "threads": 1,
        "strategies": [{"name": "direct", "params": {"b1": 2}}, {"name": "minority_first"}],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert not run_experiment(path, tmp_path / "exp", progress=False).failed
    _, store = load_experiment(tmp_path / "exp")
    rec = store.rounds(strategy="direct[b1=2]")[-1]
    # C = 3, budget 6: one version-space pick per class, then one pick around each class's threshold
    assert rec.info["oracle_asked"] == 6 and rec.info["oracle_calls"] == 6
    first = store.rounds(strategy="minority_first")[-1]
    store.close()
    assert first.classes_labeled == 3
    out = CliRunner().invoke(main, ["report", str(tmp_path / "exp"), "--json"])
    data = json.loads(out.output)["strategies"]["minority_first"]
    for key in ("balanced_aubc", "macro_f1_mean", "worst_class_recall_mean", "classes_labeled_mean"):
        assert data[key] is not None
    assert data["minority_label_share_mean"][-1] == pytest.approx(first.minority_label_share)
    text = CliRunner().invoke(main, ["report", str(tmp_path / "exp")]).output
    assert "imbalance metrics" in text and "macro-F1" in text


def test_bengar_refuses_an_lp_too_big_for_memory_up_front():
    import activelab
    from activelab.errors import ActivelabError

    from .conftest import TinyNet, make_pool

    with pytest.raises(ActivelabError, match=r"N=48 candidates.*subsample"):
        activelab.select("bengar", TinyNet(), make_pool(), labeled=list(range(12)), budget=4, max_candidates=40)
    out = activelab.select(
        "bengar", TinyNet(), make_pool(), labeled=list(range(12)), budget=4, wrap=[("subsample", {"size": 40})],
        max_candidates=40,
    )  # fmt: skip
    assert len(set(out.tolist())) == 4
