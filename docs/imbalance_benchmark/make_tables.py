"""Tables and balanced-accuracy curves of the imbalance benchmark, from experiment directories.

    python docs/imbalance_benchmark/make_tables.py runs/imbalance_digits_step10 runs/imbalance_digits_clip3 ...

Writes docs/imbalance_benchmark/tables.md, figures/<experiment>_balanced.png and report_<experiment>.json.
Every number comes from the experiment's store through activelab's own summary (nothing typed in).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from activelab.experiment.runner import load_experiment  # noqa: E402
from activelab.metrics import labels_to_target  # noqa: E402
from activelab.report.summary import report_json, summarize  # noqa: E402

HERE = Path(__file__).parent
CEILING, FLOOR = "minority_first", "random"


def pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}"


def last(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def table(exp_dir: Path) -> tuple[str, dict]:
    cfg, store = load_experiment(exp_dir)
    summaries = summarize(cfg, store)
    store.close()
    (HERE / f"report_{cfg.name}.json").write_text(json.dumps(report_json(cfg, summaries), indent=1) + "\n")
    target = cfg.loop.target_accuracy
    lines = [
        f"### {cfg.name}",
        "",
        f"{cfg.description}. Runs complete per strategy: "
        + ", ".join(sorted({str(s.runs) for s in summaries.values()}))
        + f"; labels {int(min(s.labels[0] for s in summaries.values()))} to "
        f"{int(max(s.labels[-1] for s in summaries.values()))}.",
        "",
        f"| strategy | AUBC acc | AUBC bal. acc | worst-class recall | macro-F1 | minority label share | "
        f"classes labeled | labels to {pct(target, 0)}% bal. acc | select s / round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summaries.items():
        acc = "—" if s.aubc is None else f"{100 * s.aubc:.1f} ± {100 * (s.aubc_std or 0):.1f}"
        bal_std = 100 * (s.balanced_aubc_std or 0)
        bal = "—" if s.balanced_aubc is None else f"{100 * s.balanced_aubc:.1f} ± {bal_std:.1f}"
        sel = [v for v in s.select_seconds_mean if v is not None]
        bal_ltt = None
        if target is not None and all(v is not None for v in s.balanced_accuracy_mean):
            bal_ltt = labels_to_target(s.labels, s.balanced_accuracy_mean, target)
        ltt = "never" if bal_ltt is None else f"{bal_ltt:.0f}"
        classes = last(s.classes_labeled_mean)
        lines.append(
            f"| {key} | {acc} | {bal} | {pct(last(s.worst_class_recall_mean))} | {pct(last(s.macro_f1_mean))} | "
            f"{pct(last(s.minority_label_share_mean))} | {'—' if classes is None else f'{classes:.1f}'} | {ltt} | "
            f"{np.mean(sel):.2f} |"
            if sel
            else f"| {key} | {acc} | {bal} | — | — | — | — | {ltt} | — |"
        )
    gap = {}
    if FLOOR in summaries and CEILING in summaries:
        lo, hi = summaries[FLOOR].balanced_aubc, summaries[CEILING].balanced_aubc
        best_key = max(
            (k for k in summaries if k not in (FLOOR, CEILING) and summaries[k].balanced_aubc is not None),
            key=lambda k: summaries[k].balanced_aubc,
        )
        best = summaries[best_key].balanced_aubc
        closed = (best - lo) / (hi - lo) if hi is not None and lo is not None and hi != lo else None
        gap = {"experiment": cfg.name, "random": lo, "ceiling": hi, "best": best_key, "best_value": best}
        gap["closed"] = closed
        lines += [
            "",
            f"Balanced-accuracy AUBC: random {pct(lo)}, minority_first {pct(hi)}, best strategy {best_key} "
            f"{pct(best)}: it closes {pct(closed, 0)}% of the gap (goal: at least 50%).",
        ]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (key, s) in enumerate(summaries.items()):
        pts = [(n, b) for n, b in zip(s.labels, s.balanced_accuracy_mean, strict=True) if b is not None]
        if pts:
            style = "--" if key in (FLOOR, CEILING) else "-"
            xs, ys = [p[0] for p in pts], [100 * p[1] for p in pts]
            ax.plot(xs, ys, style, marker="o", ms=3, label=key, color=plt.cm.tab20(i % 20))
    ax.set_xlabel("labeled samples")
    ax.set_ylabel("balanced accuracy on the test set (%)")
    ax.set_title(f"{cfg.name} (mean over runs)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    (HERE / "figures").mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(HERE / "figures" / f"{cfg.name}_balanced.png", dpi=110)
    plt.close(fig)
    lines += ["", f"![balanced accuracy](figures/{cfg.name}_balanced.png)", ""]
    return "\n".join(lines), gap


def main() -> None:
    parts, gaps = [], []
    for arg in sys.argv[1:]:
        text, gap = table(Path(arg))
        parts.append(text)
        gaps.append(gap)
    (HERE / "tables.md").write_text("\n".join(parts) + "\n")
    (HERE / "gaps.json").write_text(json.dumps(gaps, indent=1) + "\n")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
