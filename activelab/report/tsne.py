"""t-SNE of the test set coloured by class, misclassified samples drawn larger (FK paper, Fig. 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ActivelabError
from .confusion import _outputs


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE (sklearn, PCA init) of ``features`` (N, d); perplexity is capped below N."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    if len(features) < 3:
        raise ActivelabError(f"t-SNE needs at least 3 samples; got {len(features)}")
    perplexity = min(perplexity, (len(features) - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def plot_tsne(
    features: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    path: str | Path,
    seed: int = 0,
    title: str | None = None,
    class_names: list[str] | None = None,
) -> list[Path]:
    """Scatter of the t-SNE of ``features`` coloured by true class; misclassified samples larger, with a
    black edge. Writes ``path``.png and ``path``.pdf and returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if not (len(features) == len(y_true) == len(y_pred)):
        raise ActivelabError(f"features, y_true, y_pred have {len(features)}, {len(y_true)}, {len(y_pred)} rows")
    xy = tsne_embedding(features, seed)
    wrong = y_true != y_pred
    classes = np.unique(y_true)
    cmap = plt.get_cmap("tab10" if classes.max() < 10 else "tab20")
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for c in classes:
        ok = (y_true == c) & ~wrong
        bad = (y_true == c) & wrong
        name = class_names[c] if class_names else str(c)
        ax.scatter(xy[ok, 0], xy[ok, 1], s=4, color=cmap(c % cmap.N), label=name, linewidths=0)
        ax.scatter(xy[bad, 0], xy[bad, 1], s=28, color=cmap(c % cmap.N), edgecolors="black", linewidths=0.5)
    acc = 100 * (1 - wrong.mean())
    ax.set_title(f"{title + ', ' if title else ''}accuracy {acc:.1f}% (large: misclassified)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    outputs = _outputs(path)
    for out in outputs:
        fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return outputs
