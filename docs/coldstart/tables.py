"""Markdown tables of a cold-start experiment (configs/coldstart_*.yaml) from its results store.

    python docs/coldstart/tables.py runs/coldstart_digits_step > docs/coldstart/digits_step.md

For each first-round strategy and first budget: test accuracy after the first round and after the last margin
round, classes with at least one label after the first round, and (step-biased pools) the minority classes'
share of the first round's labels; mean ± std over the runs that have the round. Also the first round's
per-class label counts summed over runs, and where the stopping criteria would have stopped.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np

from activelab.experiment.runner import load_experiment
from activelab.report.stopping import stopping_summary


def _ms(values: list[float], pct: bool = True) -> str:
    if not values:
        return "-"
    scale = 100 if pct else 1
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def main(exp_dir: str) -> None:
    cfg, store = load_experiment(exp_dir)
    runs = store.runs()
    minority = next(iter(runs.values()))["minority"] if runs else []
    last = cfg.loop.rounds
    print(f"### {cfg.name}: {cfg.description}\n")
    print(f"{len(runs)} run(s); first round = round 1, then margin for rounds 2..{last} "
          f"(+{cfg.loop.budget} labels each).\n")  # fmt: skip
    head = "| first round | labels (first) | acc. after first | classes labeled (first) |"
    head += " minority share (first) |" if minority else ""
    head += f" labels (round {last}) | acc. round {last} | runs |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    counts_rows = []
    for s in cfg.strategies:
        recs = store.rounds(strategy=s.label)
        by_round: dict[int, list] = defaultdict(list)
        for r in recs:
            by_round[r.round].append(r)
        first, final = by_round.get(1, []), by_round.get(last, [])
        row = f"| {s.first_round.name} | {s.first_round.budget} | {_ms([r.accuracy for r in first])} | "
        row += f"{_ms([r.classes_labeled for r in first], pct=False)} |"
        if minority:
            row += f" {_ms([r.minority_label_share for r in first])} |"
        labels = f"{np.mean([r.n_labeled for r in final]):.0f}" if final else "-"
        row += f" {labels} | {_ms([r.accuracy for r in final])} | {len(final)}/{len(first)} |"
        print(row)
        if first:
            counts_rows.append(
                (s.first_round.name, s.first_round.budget, np.sum([r.labeled_per_class for r in first], 0))
            )
    print("\nFirst-round labels per class, summed over runs:\n")
    k = len(counts_rows[0][2]) if counts_rows else 0
    print("| first round | labels | " + " | ".join(f"c{c}{'*' if c in minority else ''}" for c in range(k)) + " |")
    print("|---|---|" + "---|" * k)
    for name, b0, counts in counts_rows:
        print(f"| {name} | {b0} | " + " | ".join(str(int(v)) for v in counts) + " |")
    if minority:
        print("\n\\* minority class")
    stopping = stopping_summary(cfg, store)
    if stopping:
        print("\nWhere the stopping criteria would have stopped (mean labels and accuracy there, over runs that "
              "stopped):\n")  # fmt: skip
        print("| strategy | criterion | stopped | labels | accuracy |")
        print("|---|---|---|---|---|")
        for key, rows in stopping.items():
            for c, row in rows.items():
                lab = f"{row['labels']:.0f}" if row["labels"] is not None else "-"
                acc = f"{100 * row['accuracy']:.1f}" if row["accuracy"] is not None else "-"
                print(f"| {key} | {c} | {row['stopped']}/{row['runs']} | {lab} | {acc} |")
    store.close()


if __name__ == "__main__":
    main(sys.argv[1])
