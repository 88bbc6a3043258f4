"""Aggregate an experiment's rounds over runs: the data behind ``activelab report`` and ``activelab plot``.

Which runs a curve averages: the *finished* runs of the strategy (every round recorded, or ended by a stopping
criterion), the same runs at every round, so a run that failed or is still going never changes the population
mid-curve. While no run of a strategy is finished, round k averages the runs complete up to round k (every
round 0..k recorded). ``runs_per_round`` says how many runs each mean holds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..config import ExperimentConfig
from ..experiment.store import Store
from .metrics import aubc, labels_to_target


@dataclass
class StrategySummary:
    key: str
    rounds: list[int]
    labels: list[float]  # mean labeled count per round
    accuracy_mean: list[float | None]
    accuracy_std: list[float | None]
    balanced_accuracy_mean: list[float | None]
    minority_recall_mean: list[float | None] | None
    select_seconds_mean: list[float | None]
    train_seconds_mean: list[float | None]
    runs_per_round: list[int]
    runs: int  # runs with every round complete
    failed_runs: dict[int, str] = field(default_factory=dict)
    incomplete_runs: list[int] = field(default_factory=list)
    incomplete_notes: dict[int, str] = field(default_factory=dict)  # why: no rounds, interrupted, running
    aubc: float | None = None
    aubc_std: float | None = None
    labels_to_target: float | None = None
    labels_to_target_vs_random: float | None = None
    minority_labeled_mean: list[float | None] = field(default_factory=list)
    # imbalance metrics per round (None for stores written before they were recorded)
    macro_f1_mean: list[float | None] = field(default_factory=list)
    worst_class_recall_mean: list[float | None] = field(default_factory=list)
    classes_labeled_mean: list[float | None] = field(default_factory=list)
    minority_label_share_mean: list[float | None] = field(default_factory=list)
    balanced_aubc: float | None = None
    balanced_aubc_std: float | None = None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def _std(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None)


def _population(per_run: dict[int, dict], finished: list[int], expected: list[int]) -> dict[int, list[int]]:
    """The runs each round's mean is taken over (see the module docstring)."""
    if finished:
        return {k: [r for r in finished if k in per_run[r]] for k in expected}
    out: dict[int, list[int]] = {}
    for i, k in enumerate(expected):
        out[k] = sorted(r for r, recs in per_run.items() if all(j in recs for j in expected[: i + 1]))
    return out


def _incomplete(cfg, per_run, finished, failed, jobs, label, writing: bool) -> dict[int, str]:
    notes = {}
    for r in range(cfg.loop.runs):
        if r in finished or r in failed:
            continue
        status = jobs.get((r, label), (None, None))[0]
        if status == "running":
            notes[r] = "running" if writing else "interrupted (its process stopped; run the config again to resume)"
        elif status == "interrupted":
            notes[r] = "interrupted (run the config again to resume)"
        elif r not in per_run:
            notes[r] = "no rounds"
        else:
            notes[r] = f"{len(per_run[r])} round(s) recorded"
    return notes


def summarize(cfg: ExperimentConfig, store: Store, target: float | None = None) -> dict[str, StrategySummary]:
    """One summary per configured strategy (in config order). Missing rounds stay None, never zero."""
    from ..experiment.layout import Layout
    from ..experiment.runner import writer_alive

    target = target if target is not None else cfg.loop.target_accuracy
    jobs = store.jobs()
    runs_info = store.runs()
    writing = writer_alive(Layout(store.path.parent))
    expected_rounds = list(range(0 if cfg.loop.initial > 0 else 1, cfg.loop.rounds + 1))
    out: dict[str, StrategySummary] = {}
    for s in cfg.strategies:
        per_run: dict[int, dict[int, object]] = defaultdict(dict)
        for rec in store.rounds(strategy=s.label):
            per_run[rec.run][rec.round] = rec
        complete = sorted(r for r, recs in per_run.items() if all(k in recs for k in expected_rounds))
        stopped = sorted(
            r
            for r, recs in per_run.items()
            if r not in complete and any("stopped_by" in (rec.info or {}) for rec in recs.values())
        )
        finished = sorted(complete + stopped)
        failed = {
            r: (err or "").splitlines()[0]
            for (r, key), (st, err) in jobs.items()
            if key == s.label and st == "failed" and r not in finished
        }
        notes = _incomplete(cfg, per_run, finished, failed, jobs, s.label, writing)
        incomplete = sorted(notes)
        population = _population(per_run, finished, expected_rounds)
        by_round = {k: [per_run[r][k] for r in population[k]] for k in expected_rounds}
        rounds = expected_rounds

        def series(attr: str, recs_by_round=by_round, rounds=rounds) -> list[list]:
            return [[getattr(rec, attr) for rec in recs_by_round.get(k, [])] for k in rounds]

        acc = series("accuracy")
        labels = [(_mean(v) if v else None) for v in series("n_labeled")]
        labels = [
            lab if lab is not None else float(cfg.loop.initial + cfg.loop.budget * k) for lab, k in zip(labels, rounds)
        ]
        has_minority = any(info["minority"] for info in runs_info.values()) if runs_info else False
        minority_labeled = []
        for k in rounds:
            vals = []
            for rec in by_round.get(k, []):
                minority = runs_info.get(rec.run, {}).get("minority", [])
                vals.append(float(sum(rec.labeled_per_class[c] for c in minority)))
            minority_labeled.append(_mean(vals) if has_minority else None)
        summary = StrategySummary(
            key=s.label,
            rounds=rounds,
            labels=labels,
            accuracy_mean=[_mean(v) for v in acc],
            accuracy_std=[_std(v) for v in acc],
            balanced_accuracy_mean=[_mean(v) for v in series("balanced_accuracy")],
            minority_recall_mean=[_mean(v) for v in series("minority_recall")] if has_minority else None,
            select_seconds_mean=[_mean(v) for v in series("select_seconds")],
            train_seconds_mean=[_mean(v) for v in series("train_seconds")],
            runs_per_round=[len(v) for v in acc],
            runs=len(complete),
            failed_runs=failed,
            incomplete_runs=incomplete,
            incomplete_notes=notes,
            minority_labeled_mean=minority_labeled,
            macro_f1_mean=[_mean(v) for v in series("macro_f1")],
            worst_class_recall_mean=[_mean(v) for v in series("worst_class_recall")],
            classes_labeled_mean=[_mean(v) for v in series("classes_labeled")],
            minority_label_share_mean=[_mean(v) for v in series("minority_label_share")],
        )
        per_run_aubc = [
            aubc([per_run[r][k].n_labeled for k in rounds], [per_run[r][k].accuracy for k in rounds]) for r in complete
        ]
        per_run_aubc = [a for a in per_run_aubc if a is not None]
        summary.aubc, summary.aubc_std = _mean(per_run_aubc), _std(per_run_aubc)
        per_run_bal = [
            aubc([per_run[r][k].n_labeled for k in rounds], [per_run[r][k].balanced_accuracy for k in rounds])
            for r in complete
        ]
        per_run_bal = [a for a in per_run_bal if a is not None]
        summary.balanced_aubc, summary.balanced_aubc_std = _mean(per_run_bal), _std(per_run_bal)
        if target is not None and all(v is not None for v in summary.accuracy_mean):
            summary.labels_to_target = labels_to_target(labels, summary.accuracy_mean, target)
        out[s.label] = summary
    reference = next((v for k, v in out.items() if k == "random"), None)
    if reference is not None and reference.labels_to_target:
        for summ in out.values():
            if summ.labels_to_target is not None:
                summ.labels_to_target_vs_random = summ.labels_to_target / reference.labels_to_target
    return out


def report_json(cfg: ExperimentConfig, summaries: dict[str, StrategySummary], target: float | None = None) -> dict:
    """The report schema of ``activelab report --json`` (see the README): per-round lists for the *_mean series;
    ``target_accuracy`` is the target the labels-to-target values were computed for."""
    strategies = {}
    for key, s in summaries.items():
        strategies[key] = {
            "labels": s.labels,
            "accuracy_mean": s.accuracy_mean,
            "accuracy_std": s.accuracy_std,
            "balanced_accuracy_mean": s.balanced_accuracy_mean,
            "minority_recall_mean": s.minority_recall_mean,
            "select_seconds_mean": s.select_seconds_mean,
            "train_seconds_mean": s.train_seconds_mean,
            "aubc": s.aubc,
            "aubc_std": s.aubc_std,
            "runs": s.runs,
            "runs_per_round": s.runs_per_round,
            "failed_runs": {str(k): v for k, v in s.failed_runs.items()},
            "incomplete_runs": s.incomplete_runs,
            "labels_to_target": s.labels_to_target,
            "labels_to_target_vs_random": s.labels_to_target_vs_random,
            "minority_labeled_mean": s.minority_labeled_mean,
            "balanced_aubc": s.balanced_aubc,
            "balanced_aubc_std": s.balanced_aubc_std,
            "macro_f1_mean": s.macro_f1_mean,
            "worst_class_recall_mean": s.worst_class_recall_mean,
            "classes_labeled_mean": s.classes_labeled_mean,
            "minority_label_share_mean": s.minority_label_share_mean,
        }
    return {
        "experiment": cfg.name,
        "target_accuracy": target if target is not None else cfg.loop.target_accuracy,
        "strategies": strategies,
    }


def _fmt(v: float | None, pct: bool = True, digits: int = 1) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.{digits}f}" if pct else f"{v:.{digits}f}"


def report_text(cfg: ExperimentConfig, summaries: dict[str, StrategySummary], target: float | None = None) -> str:
    """A table per strategy (accuracy mean ± std per round) and a summary table; ``target``: the accuracy the
    labels-to-target column was computed for (default: the config's)."""
    lines = [f"experiment {cfg.name}: {cfg.loop.runs} runs x {cfg.loop.rounds} rounds, budget {cfg.loop.budget}"]
    target = target if target is not None else cfg.loop.target_accuracy
    target_col = "labels@" + (_fmt(target, digits=0) + "%" if target else "—")
    header = f"{'strategy':<28} {'runs':>5} {'AUBC':>11} {target_col:>10} {'vs random':>9} {'minority rec. (last)':>20}"
    lines += ["", header, "-" * len(header)]
    for key, s in summaries.items():
        status = f"{s.runs}"
        if s.failed_runs:
            status += f" ({len(s.failed_runs)} failed)"
        aubc_s = "—" if s.aubc is None else f"{100 * s.aubc:.1f}±{100 * (s.aubc_std or 0):.1f}"
        ltt = "never" if target and s.labels_to_target is None else _fmt(s.labels_to_target, pct=False, digits=0)
        vsr = _fmt(s.labels_to_target_vs_random, pct=False, digits=2)
        mino = "—" if not s.minority_recall_mean else _fmt(s.minority_recall_mean[-1])
        lines.append(f"{key:<28} {status:>5} {aubc_s:>11} {ltt:>10} {vsr:>9} {mino:>20}")
    lines += _imbalance_table(summaries)
    lines.append("")
    lines.append("test accuracy % (mean ± std over runs) per round; n = runs with that round")
    for key, s in summaries.items():
        lines.append(f"  {key}")
        for k, lab, m, sd, n in zip(s.rounds, s.labels, s.accuracy_mean, s.accuracy_std, s.runs_per_round):
            cell = "missing" if m is None else f"{100 * m:5.1f} ± {100 * (sd or 0):4.1f}"
            extra = ""
            if s.minority_recall_mean is not None and s.minority_recall_mean[k - s.rounds[0]] is not None:
                extra = f"   minority recall {100 * s.minority_recall_mean[k - s.rounds[0]]:5.1f}"
            lines.append(f"    round {k:>2}  labels {lab:>7.0f}  {cell}  (n={n}){extra}")
        for run, err in s.failed_runs.items():
            lines.append(f"    run {run} FAILED: {err}")
        for run in s.incomplete_runs:
            note = s.incomplete_notes.get(run)
            lines.append(f"    run {run} incomplete" + (f": {note}" if note else ""))
    return "\n".join(lines)


def _last(values: list[float | None]) -> float | None:
    return values[-1] if values else None


def _imbalance_table(summaries: dict[str, StrategySummary]) -> list[str]:
    """Balanced-accuracy AUBC and the last round's imbalance metrics (on the test set; label counts of the
    labeled set); empty for stores that predate these metrics."""
    if not any(any(v is not None for v in s.macro_f1_mean) for s in summaries.values()):
        return []
    header = (
        f"{'strategy':<28} {'bal. AUBC':>11} {'macro-F1':>9} {'worst rec.':>10} {'classes lab.':>12} "
        f"{'minority share':>14}"
    )
    lines = ["", "imbalance metrics (last round; test set, labeled-set counts)", header, "-" * len(header)]
    for key, s in summaries.items():
        bal = "—" if s.balanced_aubc is None else f"{100 * s.balanced_aubc:.1f}±{100 * (s.balanced_aubc_std or 0):.1f}"
        classes = _last(s.classes_labeled_mean)
        lines.append(
            f"{key:<28} {bal:>11} {_fmt(_last(s.macro_f1_mean)):>9} {_fmt(_last(s.worst_class_recall_mean)):>10} "
            f"{_fmt(classes, pct=False):>12} {_fmt(_last(s.minority_label_share_mean)):>14}"
        )
    return lines
