"""Pure metrics, below both the experiment runner and the reports: per-round classification metrics and
per-curve summaries (AUBC, labels to a target accuracy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score


def round_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int,
    minority: Sequence[int],
    labeled_counts: Sequence[int] | None = None,
) -> dict:
    """Metrics of one round's test predictions (and of the labeled set, when ``labeled_counts`` is given).

    - ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present in ``y_true``);
    - ``per_class_recall`` (NaN for a class absent from ``y_true``), ``minority_recall`` (mean recall of the
      minority classes present; None without minority classes);
    - ``macro_f1``: the unweighted mean F1 over the classes present in ``y_true`` (scikit-learn, a class never
      predicted has F1 0); ``worst_class_recall``: the lowest recall among the classes present;
    - with ``labeled_counts`` (labeled samples per class): ``classes_labeled`` (classes with at least one
      label) and ``minority_label_share`` (the minority classes' share of the labeled set; None without
      minority classes or labels). Without it both are None.
    """
    labels = list(range(num_classes))
    present = np.unique(y_true)
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0.0)
    recall = [float(r) if c in present else float("nan") for c, r in enumerate(recall)]
    minority_recall = None
    if len(minority):
        values = [recall[c] for c in minority if not np.isnan(recall[c])]
        minority_recall = float(np.mean(values)) if values else None
    present_recall = [r for r in recall if not np.isnan(r)]
    macro_f1 = float(f1_score(y_true, y_pred, labels=present.tolist(), average="macro", zero_division=0.0))
    classes_labeled = minority_share = None
    if labeled_counts is not None:
        counts = np.asarray(labeled_counts, dtype=np.int64)
        classes_labeled = int(np.count_nonzero(counts))
        if len(minority) and counts.sum() > 0:
            minority_share = float(counts[list(minority)].sum() / counts.sum())
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "per_class_recall": recall,
        "minority_recall": minority_recall,
        "macro_f1": macro_f1,
        "worst_class_recall": float(min(present_recall)) if present_recall else None,
        "classes_labeled": classes_labeled,
        "minority_label_share": minority_share,
    }


def aubc(labels: Sequence[float], accuracy: Sequence[float]) -> float | None:
    """Area under the budget curve: trapezoid of accuracy over labeled counts, divided by the label range
    so that it lies in [0, 1]. None with fewer than two points."""
    x, y = np.asarray(labels, float), np.asarray(accuracy, float)
    if len(x) < 2 or x[-1] <= x[0] or np.any(np.isnan(y)):
        return None
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def labels_to_target(labels: Sequence[float], accuracy: Sequence[float], target: float) -> float | None:
    """Labels needed to first reach ``target`` accuracy, linearly interpolated between rounds; None if never.

    If the first point already reaches the target, its label count is returned.
    """
    x, y = np.asarray(labels, float), np.asarray(accuracy, float)
    for i in range(len(x)):
        if np.isnan(y[i]):
            return None
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))
    return None
