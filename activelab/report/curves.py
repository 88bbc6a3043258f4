"""Learning curves: test accuracy (mean ± std over runs) against labeled count and fraction of the pool."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .summary import StrategySummary  # noqa: E402


def plot_learning_curves(
    summaries: dict[str, StrategySummary],
    path: str | Path,
    *,
    title: str = "",
    pool_size: float | None = None,
    reference: float | None = None,
    target: float | None = None,
    highlight: str | None = None,
    strategies: Sequence[str] | None = None,
    versus: Sequence[str] | None = None,
) -> list[Path]:
    """Draw one line per strategy with a ±1 std band; write ``path`` as PNG and PDF; return the files.

    - ``pool_size``: adds a top axis with the labeled fraction of the pool (%).
    - ``reference``: a horizontal line at the whole-pool accuracy.
    - ``target`` + ``highlight``: annotate the labels ``highlight`` saves at ``target`` accuracy relative to
      the best strategy of ``versus`` (default: every other strategy) that reaches it.
    Rounds that no run completed are left out of a line (never drawn as zero); a strategy with failed runs says
      so in its legend entry.
    """
    keys = list(strategies) if strategies else list(summaries)
    fig, ax = plt.subplots(figsize=(9.5, 5))
    for key in keys:
        s = summaries[key]
        x = np.array(s.labels, float)
        m = np.array([np.nan if v is None else v for v in s.accuracy_mean], float) * 100
        sd = np.array([np.nan if v is None else v for v in s.accuracy_std], float) * 100
        ok = ~np.isnan(m)
        if not ok.any():
            ax.plot([], [], label=f"{key} (no completed round)")
            continue
        label = f"{key} (n={s.runs})"
        if s.failed_runs:
            label += f", {len(s.failed_runs)} run(s) failed"
        lw = 2.5 if key == highlight else 1.5
        (line,) = ax.plot(x[ok], m[ok], marker="o", ms=3, lw=lw, label=label)
        ax.fill_between(x[ok], (m - sd)[ok], (m + sd)[ok], color=line.get_color(), alpha=0.15)
    if reference is not None:
        ax.axhline(100 * reference, color="black", ls="--", lw=1, label=f"whole pool ({100 * reference:.1f}%)")
    if target is not None and highlight in summaries and summaries[highlight].labels_to_target is not None:
        mine = summaries[highlight].labels_to_target
        pool = versus if versus else [k for k in summaries if k != highlight]
        others = [(summaries[k].labels_to_target, k) for k in pool if summaries[k].labels_to_target is not None]
        ax.axhline(100 * target, color="grey", ls=":", lw=1)
        if others:
            best, best_key = min(others)
            saved = 1 - mine / best
            verdict = f"{100 * abs(saved):.0f}% {'fewer' if saved >= 0 else 'more'} labels than {best_key}"
            ax.annotate(
                f"{highlight}: {verdict}\nat {100 * target:.0f}% accuracy",
                xy=(mine, 100 * target),
                xytext=(0.45, 0.15),
                textcoords="axes fraction",
                arrowprops={"arrowstyle": "->", "color": "grey"},
                fontsize=9,
            )
    ax.set_xlabel("labeled samples")
    ax.set_ylabel("test accuracy (%)")
    if pool_size:
        top = ax.secondary_xaxis("top", functions=(lambda n: 100 * n / pool_size, lambda f: f * pool_size / 100))
        top.set_xlabel("labeled fraction of the pool (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    for f in files:
        fig.savefig(f, dpi=150)
    plt.close(fig)
    return files
