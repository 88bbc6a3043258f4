"""Confusion matrices and t-SNE: the numbers in the titles, and files on disk."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, recall_score

from activelab.errors import ActivelabError
from activelab.report.confusion import (
    confusion_counts,
    minority_mean_recall,
    plot_confusion_matrices,
    row_normalise,
)
from activelab.report.tsne import plot_tsne


def test_counts_normalisation_and_minority_recall_hand_worked():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 2, 1, 0, 2, 2, 2, 0])
    counts = confusion_counts(y_true, y_pred, 4)
    np.testing.assert_array_equal(counts[:3, :3], [[2, 1, 1], [1, 1, 0], [1, 0, 3]])
    np.testing.assert_array_equal(counts, confusion_matrix(y_true, y_pred, labels=range(4)))
    norm = row_normalise(counts)
    np.testing.assert_allclose(norm[:3], [[0.5, 0.25, 0.25, 0], [0.5, 0.5, 0, 0], [0.25, 0, 0.75, 0]])
    assert np.all(np.isnan(norm[3]))  # class 3 absent from the test labels
    assert minority_mean_recall(norm, [1, 2]) == pytest.approx((0.5 + 0.75) / 2)
    assert minority_mean_recall(norm, [2, 3]) == pytest.approx(0.75)  # absent classes are skipped
    assert minority_mean_recall(norm, []) is None
    np.testing.assert_allclose(np.diag(norm)[:3], recall_score(y_true, y_pred, labels=[0, 1, 2], average=None))


def test_bad_labels_are_errors():
    with pytest.raises(ActivelabError):
        confusion_counts(np.array([0, 5]), np.array([0, 1]), 3)
    with pytest.raises(ActivelabError):
        confusion_counts(np.array([0, 1]), np.array([0]), 3)


def test_confusion_figure_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    panels = [("random", y, rng.integers(0, 5, 200)), ("fk", y, np.where(rng.random(200) < 0.8, y, 0))]
    files = plot_confusion_matrices(panels, [f"c{i}" for i in range(5)], [3, 4], tmp_path / "sub" / "cm.png")
    assert [f.name for f in files] == ["cm.png", "cm.pdf"]
    assert all(f.stat().st_size > 1000 for f in files)
    with pytest.raises(ActivelabError):
        plot_confusion_matrices([], ["a"], [], tmp_path / "none")


def test_tsne_figure_files(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 15)
    feats = rng.normal(size=(45, 6)) + y[:, None] * 4
    pred = y.copy()
    pred[:4] = 1
    files = plot_tsne(feats, y, pred, tmp_path / "tsne", seed=0, title="fk")
    assert [f.suffix for f in files] == [".png", ".pdf"] and all(f.stat().st_size > 1000 for f in files)
    with pytest.raises(ActivelabError):
        plot_tsne(feats[:5], y, pred, tmp_path / "bad")
