"""Per-round metrics and curve summaries against hand-worked values."""

import numpy as np
import pytest

from activelab.data.pool_state import UNLABELED, PoolState
from activelab.report.metrics import aubc, labels_to_target, round_metrics


def test_round_metrics_hand_worked():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2, 0])
    m = round_metrics(y_true, y_pred, num_classes=3, minority=[1, 2])
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["per_class_recall"] == pytest.approx([0.75, 0.5, 0.5])
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert m["minority_recall"] == pytest.approx(0.5)


def test_round_metrics_no_minority_is_none_and_absent_class_is_nan():
    m = round_metrics(np.array([0, 1]), np.array([0, 1]), num_classes=3, minority=[])
    assert m["minority_recall"] is None
    assert np.isnan(m["per_class_recall"][2])


def test_aubc_trapezoid_normalised():
    # area of a line from 0.5 to 1.0 over [100, 300] = 0.75 * 200, normalised: 0.75
    assert aubc([100, 200, 300], [0.5, 0.75, 1.0]) == pytest.approx(0.75)
    assert aubc([100, 200, 400], [0.2, 0.4, 0.4]) == pytest.approx((0.3 * 100 + 0.4 * 200) / 300)
    assert aubc([100], [0.5]) is None
    assert aubc([100, 200], [0.5, float("nan")]) is None


def test_labels_to_target_interpolates():
    assert labels_to_target([100, 200, 300], [0.5, 0.7, 0.9], 0.8) == pytest.approx(250)
    assert labels_to_target([100, 200], [0.85, 0.9], 0.8) == pytest.approx(100)
    assert labels_to_target([100, 200], [0.5, 0.6], 0.8) is None
    # the first crossing counts, even if accuracy falls later
    assert labels_to_target([100, 200, 300], [0.5, 0.9, 0.7], 0.8) == pytest.approx(175)


def test_pool_state_rounds_and_roundtrip(tmp_path):
    s = PoolState(10)
    s.label([3, 1], 0)
    s.label([7], 1)
    assert s.labeled.tolist() == [1, 3, 7]
    assert s.labeled_in(1).tolist() == [7]
    assert s.rounds == 1 and s.labeled_round[0] == UNLABELED
    with pytest.raises(ValueError, match="already labeled"):
        s.label([7], 2)
    s.save(tmp_path / "p.npz")
    t = PoolState.load(tmp_path / "p.npz")
    assert t.labeled_round.tolist() == s.labeled_round.tolist()
    u = PoolState.from_selections(10, {1: np.array([7]), 0: np.array([1, 3])})
    assert u.labeled_round.tolist() == s.labeled_round.tolist()


def test_imbalance_round_metrics_hand_worked():
    from activelab.metrics import round_metrics as pure

    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2, 0])
    m = pure(y_true, y_pred, num_classes=4, minority=[1, 2], labeled_counts=[6, 3, 1, 0])
    # F1 per present class: 0: p=3/5 r=3/4 -> 2/3; 1: p=1/2 r=1/2 -> 1/2; 2: p=1 r=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert m["worst_class_recall"] == pytest.approx(0.5)
    assert m["classes_labeled"] == 3
    assert m["minority_label_share"] == pytest.approx(4 / 10)
    bare = pure(y_true, y_pred, num_classes=3, minority=[])
    assert bare["classes_labeled"] is None and bare["minority_label_share"] is None
