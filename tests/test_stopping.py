"""Stopping criteria on hand-made sequences with known stop rounds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from activelab.errors import ActivelabError
from activelab.stopping import (
    StopWhen,
    budget_stop_round,
    cohen_kappa,
    should_stop,
    stabilizing_predictions_stop_round,
    stop_rounds,
    stop_set_uncertainty,
    successive_kappas,
    uncertainty_stop_round,
)

A = np.array([0] * 5 + [1] * 5)
B = np.array([0] * 4 + [1] * 6)  # agrees on 9/10; chance 0.5*0.4 + 0.5*0.6 = 0.5 -> kappa (0.9-0.5)/0.5 = 0.8


def test_kappa_hand_worked_and_against_sklearn():
    assert cohen_kappa(A, B) == pytest.approx(0.8)
    assert cohen_kappa(A, A) == 1.0
    assert cohen_kappa(np.zeros(4, int), np.zeros(4, int)) == 1.0  # both constant and equal: full agreement
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(4, size=50), rng.integers(4, size=50)
        assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    with pytest.raises(ActivelabError):
        cohen_kappa(A, B[:5])


def test_stabilizing_predictions_known_stop_round():
    # rounds: 0 A, 1 B, 2 A, 3 A, 4 A, 5 A -> kappas None, 0.8, 0.8, 1, 1, 1
    preds = [A, B, A, A, A, A]
    kappas = successive_kappas(preds)
    assert kappas[0] is None and kappas[1:] == pytest.approx([0.8, 0.8, 1.0, 1.0, 1.0])
    assert stabilizing_predictions_stop_round(kappas, window=3, threshold=0.99) == 5  # first window 1, 1, 1
    assert stabilizing_predictions_stop_round(kappas, window=2, threshold=0.99) == 4
    assert stabilizing_predictions_stop_round(kappas, window=3, threshold=0.93) == 4  # mean(0.8, 1, 1) = 0.933
    assert stabilizing_predictions_stop_round(kappas, window=1, threshold=0.8) == 1
    assert stabilizing_predictions_stop_round(kappas[:5], window=3, threshold=0.99) is None
    # a window never reaches back past round 0 (kappa undefined there)
    assert stabilizing_predictions_stop_round([None, 1.0, 1.0], window=3, threshold=0.5) is None


def test_uncertainty_and_budget_known_stop_rounds():
    probs = [np.array([[0.5, 0.5], [0.7, 0.3]]), np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([[1.0, 0.0]] * 2)]
    u = [stop_set_uncertainty(p) for p in probs]
    assert u == pytest.approx([0.4, 0.15, 0.0])
    assert stop_set_uncertainty(probs[0], "entropy") == pytest.approx(
        np.mean([np.log(2), -(0.7 * np.log(0.7) + 0.3 * np.log(0.3))])
    )
    assert uncertainty_stop_round(u, 0.2) == 1 and uncertainty_stop_round(u, 0.15) == 1
    assert uncertainty_stop_round(u, 0.1) == 2 and uncertainty_stop_round(u, -1) is None
    assert budget_stop_round([10, 20, 30], 20) == 1 and budget_stop_round([10, 20], 25) is None
    got = stop_rounds(
        successive_kappas([A, B, A, A, A, A]),
        u + [0, 0, 0],
        [10, 20, 30, 40, 50, 60],
        uncertainty_threshold=0.2,
        budget=45,
    )
    assert got == {"stabilizing_predictions": 5, "uncertainty": 1, "budget": 4}


def test_should_stop_rule():
    kappas = successive_kappas([A, B, A, A, A, A])
    rule = StopWhen(stabilizing_kappa=0.99)
    fired = [should_stop(rule, kappas[: r + 1], [0.5] * (r + 1), list(range(r + 1))) for r in range(6)]
    assert fired == [None] * 5 + ["stabilizing_predictions"]
    assert should_stop(StopWhen(labels=3), [None], [None], [3]) == "budget"
    with pytest.raises(ValueError):
        StopWhen(no_such=1)


def test_experiment_stop_set_stop_when_first_round_and_report(tmp_path):
    """End to end on digits: a label-free first round (typiclust, 20 labels) then margin; the stop set's values
    are stored per round; stop_when ends the run at 40 labels; resuming does not continue it; report shows it."""
    import yaml
    from click.testing import CliRunner

    from activelab.cli import main
    from activelab.experiment.runner import load_experiment, run_experiment

    cfg = {
        "name": "stop",
        "dataset": {"name": "digits"},
        "validation": {"per_class": 3},
        "model": {"name": "digits_cnn"},
        "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 32, "epochs": 2},
        "loop": {"initial": 0, "budget": 10, "rounds": 5, "runs": 1, "seed": 1, "stop_set": 150,
                 "stop_when": {"labels": 40}},
        "threads": 1,
        "strategies": [{"name": "margin", "first_round": {"name": "typiclust", "budget": 20}}],
    }  # fmt: skip
    path = tmp_path / "stop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert not run_experiment(path, tmp_path / "exp", progress=False).failed
    _, store = load_experiment(tmp_path / "exp")
    recs = sorted(store.rounds(), key=lambda r: r.round)
    store.close()
    assert [r.strategy for r in recs][0] == "typiclust@20>margin"
    assert [r.n_labeled for r in recs] == [20, 30, 40]  # stopped at the labels criterion
    assert recs[0].info["first_round"] == "typiclust@20" and "first_round" not in recs[1].info
    assert recs[-1].info["stopped_by"] == "budget" and "stopped_by" not in recs[-2].info
    entries = [r.info["stop_set"] for r in recs]
    assert entries[0]["kappa"] is None and all(len(e["predictions"]) == 150 for e in entries)
    for prev, cur in zip(entries, entries[1:]):  # kappa recomputed from the stored predictions
        assert cur["kappa"] == pytest.approx(cohen_kappa(np.array(prev["predictions"]), np.array(cur["predictions"])))
    assert all(0 <= e["least_confidence"] <= 1 for e in entries)
    assert not run_experiment(path, tmp_path / "exp", progress=False).failed  # resume: nothing more
    _, store = load_experiment(tmp_path / "exp")
    assert len(store.rounds()) == 3
    store.close()
    out = CliRunner().invoke(main, ["report", str(tmp_path / "exp")])
    assert out.exit_code == 0, out.output
    budget_row = next(line for line in out.output.splitlines() if "budget  " in line and "typiclust" in line)
    assert "1/1" in budget_row and " 40 " in budget_row
