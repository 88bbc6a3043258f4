"""Where each stopping criterion would have stopped each strategy, and the accuracy there (``activelab report``).

Reads the per-round stop-set values that runs with ``loop.stop_set`` store (``info["stop_set"]``). Thresholds:
those of ``loop.stop_when`` where given, else kappa >= 0.99 over 3 rounds (Bloodgood & Vijay-Shanker 2009) and
mean least confidence <= 0.05; the budget criterion is ``stop_when.labels`` or the last configured round.
"""

from __future__ import annotations

from collections import defaultdict

from ..config import ExperimentConfig
from ..experiment.store import Store
from ..stopping import StopWhen, stop_rounds

CRITERIA = ("stabilizing_predictions", "uncertainty", "budget")


def _rule(cfg: ExperimentConfig) -> StopWhen:
    given = cfg.loop.stop_when or StopWhen()
    return StopWhen(
        stabilizing_kappa=given.stabilizing_kappa or 0.99,
        window=given.window,
        uncertainty_below=given.uncertainty_below if given.uncertainty_below is not None else 0.05,
        measure=given.measure,
        labels=given.labels,
    )


def stopping_summary(cfg: ExperimentConfig, store: Store) -> dict | None:
    """{strategy: {criterion: {"runs": n, "stopped": k, "labels": mean, "accuracy": mean}}}, or None when no
    round has stop-set values."""
    rule = _rule(cfg)
    out: dict = {}
    seen = False
    for s in cfg.strategies:
        per_run: dict[int, list] = defaultdict(list)
        for rec in store.rounds(strategy=s.label):
            per_run[rec.run].append(rec)
        rows: dict[str, dict] = {c: {"runs": 0, "stopped": 0, "labels": [], "accuracy": []} for c in CRITERIA}
        for recs in per_run.values():
            recs.sort(key=lambda r: r.round)
            entries = [r.info.get("stop_set") or {} for r in recs]
            seen = seen or any(entries)
            budget = rule.labels if rule.labels is not None else recs[-1].n_labeled
            where = stop_rounds(
                [e.get("kappa") for e in entries],
                [e.get(rule.measure) for e in entries],
                [r.n_labeled for r in recs],
                window=rule.window,
                kappa_threshold=rule.stabilizing_kappa,
                uncertainty_threshold=rule.uncertainty_below,
                budget=budget,
            )
            for c in CRITERIA:
                rows[c]["runs"] += 1
                if where[c] is not None:
                    rows[c]["stopped"] += 1
                    rows[c]["labels"].append(recs[where[c]].n_labeled)
                    rows[c]["accuracy"].append(recs[where[c]].accuracy)
        for row in rows.values():
            row["labels"] = sum(row["labels"]) / len(row["labels"]) if row["labels"] else None
            row["accuracy"] = sum(row["accuracy"]) / len(row["accuracy"]) if row["accuracy"] else None
        out[s.label] = rows
    return out if seen else None


def stopping_text(cfg: ExperimentConfig, summary: dict | None) -> str:
    if not summary:
        return ""
    rule = _rule(cfg)
    lines = [
        f"Stopping (stop set of {cfg.loop.stop_set}; stabilizing predictions: mean kappa >= {rule.stabilizing_kappa} "
        f"over {rule.window} rounds; uncertainty: mean {rule.measure} <= {rule.uncertainty_below}; budget: "
        f"{rule.labels if rule.labels is not None else 'the last round'})",
        f"{'strategy':<32} {'criterion':<24} {'stopped':>8} {'labels':>8} {'accuracy':>9}",
    ]
    for key, rows in summary.items():
        for c, row in rows.items():
            labels = f"{row['labels']:.0f}" if row["labels"] is not None else "-"
            acc = f"{100 * row['accuracy']:.1f}%" if row["accuracy"] is not None else "-"
            lines.append(f"{key:<32} {c:<24} {row['stopped']:>3}/{row['runs']:<4} {labels:>8} {acc:>9}")
    return "\n".join(lines)
