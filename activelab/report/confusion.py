"""Row-normalised test confusion matrices of several strategies side by side (FK paper, Fig. 4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ActivelabError


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ActivelabError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_classes):
        raise ActivelabError(f"labels must lie in [0, {num_classes})")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def row_normalise(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the recall of that class on the diagonal); empty rows stay NaN."""
    counts = np.asarray(counts, dtype=np.float64)
    sums = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums > 0, counts / np.where(sums > 0, sums, 1), np.nan)


def minority_mean_recall(normalised: np.ndarray, minority: Sequence[int]) -> float | None:
    """Mean of the diagonal of a row-normalised matrix over the minority classes present (None if none)."""
    values = [normalised[c, c] for c in minority if not np.isnan(normalised[c, c])]
    return float(np.mean(values)) if values else None


def _outputs(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.suffix.lower() in (".png", ".pdf"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    return [path.with_name(path.name + ".png"), path.with_name(path.name + ".pdf")]


def plot_confusion_matrices(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    minority: Sequence[int],
    path: str | Path,
) -> list[Path]:
    """One row-normalised confusion matrix per ``(title, y_true, y_pred)`` panel, side by side, each titled
    with the minority classes' mean recall. Writes ``path``.png and ``path``.pdf (a .png/.pdf suffix on
    ``path`` is dropped) and returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ActivelabError("no confusion matrices to draw: pass at least one (title, y_true, y_pred)")
    c = len(class_names)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.8, 3.9), squeeze=False)
    image = None
    for ax, (title, y_true, y_pred) in zip(axes[0], panels, strict=True):
        norm = row_normalise(confusion_counts(y_true, y_pred, c))
        image = ax.imshow(np.nan_to_num(norm, nan=0.0), vmin=0.0, vmax=1.0, cmap="Blues")
        for i in range(c):
            for j in range(c):
                if not np.isnan(norm[i, j]) and (i == j or norm[i, j] >= 0.05):
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.6 else "black")  # fmt: skip
        rec = minority_mean_recall(norm, minority)
        subtitle = f"minority recall {100 * rec:.1f}%" if rec is not None else "no minority classes"
        ax.set_title(f"{title}\n{subtitle}", fontsize=9)
        ax.set_xticks(range(c), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(c), class_names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        for m in minority:
            ax.get_yticklabels()[m].set_color("tab:red")
    axes[0][0].set_ylabel("true", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02, pad=0.02)
    outputs = _outputs(path)
    for out in outputs:
        fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return outputs
