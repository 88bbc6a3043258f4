"""End to end: run, resume after SIGKILL, refuse a changed config, report failures, report and plot."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from activelab.cli import main
from activelab.experiment.runner import load_experiment, run_experiment
from activelab.strategies.base import Strategy, register

TINY = {
    "name": "tiny",
    "dataset": {"name": "digits"},
    "bias": {"kind": "step", "ratio": 5},
    "validation": {"per_class": 5},
    "model": {"name": "digits_cnn"},
    "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 32, "epochs": 3, "select_by": "validation"},
    "loop": {"initial": 10, "budget": 10, "rounds": 3, "runs": 2, "seed": 7, "target_accuracy": 0.3},
    "threads": 1,
    "strategies": [{"name": "random"}, {"name": "entropy"}],
}


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(exp_dir: Path) -> dict:
    """Everything a run produced that must not depend on interruptions: rounds and final weights."""
    cfg, store = load_experiment(exp_dir)
    out = {}
    for rec in store.rounds():
        key = (rec.run, rec.strategy, rec.round)
        out[key] = (
            rec.n_labeled,
            rec.accuracy,
            rec.selected.tolist(),
            rec.test_predictions.tolist(),
            rec.labeled_per_class,
        )
    store.close()
    for p in sorted((exp_dir / "models").rglob("round*.pt")):
        out[str(p.relative_to(exp_dir))] = [v.numpy().tolist() for v in torch.load(p).values()]
    return out


def test_run_report_plot_end_to_end(tmp_path):
    cfg_path = write_config(tmp_path / "tiny.yaml", TINY)
    outcome = run_experiment(cfg_path, tmp_path / "exp", progress=False)
    assert not outcome.failed and len(outcome.done) == 4
    cfg, store = load_experiment(tmp_path / "exp")
    recs = store.rounds()
    assert len(recs) == 2 * 2 * 4  # runs x strategies x (round 0 + 3 rounds)
    for rec in recs:
        assert rec.n_labeled == 10 + 10 * rec.round
        assert sum(rec.labeled_per_class) == rec.n_labeled
        assert 0 <= rec.accuracy <= 1
    # every strategy of a run starts from the same initial labeled set
    r0 = {r.strategy: r.selected.tolist() for r in recs if r.run == 0 and r.round == 0}
    assert r0["random"] == r0["entropy"]
    # ... and the same round-0 model, so the first acquisition of every strategy starts from one model
    w = [torch.load(tmp_path / f"exp/models/run1/{k}/round0.pt") for k in ("random", "entropy")]
    assert all(torch.equal(w[0][name], w[1][name]) for name in w[0])
    runs = store.runs()
    assert runs[0]["minority"] == [5, 6, 7, 8, 9]
    assert not set(runs[0]["pool_indices"]) & set(runs[0]["validation_indices"])
    store.close()

    res = CliRunner().invoke(main, ["report", str(tmp_path / "exp"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["experiment"] == "tiny"
    for key in ("random", "entropy"):
        s = rep["strategies"][key]
        for field in (
            "labels",
            "accuracy_mean",
            "accuracy_std",
            "balanced_accuracy_mean",
            "minority_recall_mean",
            "select_seconds_mean",
            "aubc",
            "runs",
            "labels_to_target",
        ):
            assert field in s
        assert s["labels"] == [10, 20, 30, 40] and s["runs"] == 2
        acc = [r.accuracy for r in recs if r.strategy == key and r.round == 2]
        assert s["accuracy_mean"][2] == pytest.approx(np.mean(acc))
    res = CliRunner().invoke(main, ["report", str(tmp_path / "exp")])
    assert res.exit_code == 0 and "AUBC" in res.output and "entropy" in res.output
    res = CliRunner().invoke(main, ["plot", str(tmp_path / "exp"), "--confusion", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "exp/figures/learning_curves.png").stat().st_size > 10_000
    assert (tmp_path / "exp/figures/learning_curves.pdf").exists()
    # a second run of a finished experiment does nothing
    again = run_experiment(cfg_path, tmp_path / "exp", progress=False)
    assert not again.done and len(again.skipped) == 4


def test_changed_config_is_refused(tmp_path):
    cfg = {**TINY, "loop": {**TINY["loop"], "rounds": 1, "runs": 1}, "strategies": [{"name": "random"}]}
    run_experiment(write_config(tmp_path / "a.yaml", cfg), tmp_path / "exp", progress=False)
    changed = {**cfg, "train": {**cfg["train"], "lr": 0.01}}
    res = CliRunner().invoke(
        main,
        ["run", str(write_config(tmp_path / "b.yaml", changed)), "--out", str(tmp_path / "exp"), "--quiet"],
    )
    assert res.exit_code == 2
    assert "different config" in res.output and "train.lr: 0.003 (stored) vs 0.01 (given)" in res.output


def test_more_runs_extend_an_experiment(tmp_path):
    """Raising loop.runs and running into the same directory runs only the new runs, and each equals the same
    run of an experiment that had all the runs from the start; fewer runs leave the stored config alone."""
    one = {**TINY, "loop": {**TINY["loop"], "rounds": 1, "runs": 1}, "strategies": [{"name": "random"}]}
    two = {**one, "loop": {**one["loop"], "runs": 2}}
    run_experiment(write_config(tmp_path / "one.yaml", one), tmp_path / "grown", progress=False)
    before = snapshot(tmp_path / "grown")
    grown = run_experiment(write_config(tmp_path / "two.yaml", two), tmp_path / "grown", progress=False)
    assert grown.done == [(1, "random")] and grown.skipped == [(0, "random")]
    run_experiment(tmp_path / "two.yaml", tmp_path / "fresh", progress=False)
    after, fresh = snapshot(tmp_path / "grown"), snapshot(tmp_path / "fresh")
    assert after == fresh and all(after[k] == v for k, v in before.items())
    assert any(k[0] == 1 for k in after if isinstance(k, tuple))
    cfg, store = load_experiment(tmp_path / "grown")
    assert cfg.loop.runs == 2
    store.close()
    again = run_experiment(tmp_path / "one.yaml", tmp_path / "grown", progress=False)  # fewer runs: nothing to do
    cfg, store = load_experiment(tmp_path / "grown")
    assert not again.done and cfg.loop.runs == 2
    store.close()


@register
class _FailsInRound2(Strategy):
    """Test-only strategy: raises in its second selection."""

    name = "_test_fails_round2"

    def query(self, ctx, budget, rng):
        if len(ctx.labeled) >= 20:
            raise RuntimeError("deliberate failure")
        return rng.choice(len(ctx.candidates), budget, replace=False)


def test_failed_run_is_reported_not_zero(tmp_path):
    cfg = {
        **TINY,
        "loop": {**TINY["loop"], "runs": 1},
        "strategies": [{"name": "random"}, {"name": "_test_fails_round2"}],
    }
    outcome = run_experiment(write_config(tmp_path / "f.yaml", cfg), tmp_path / "exp", progress=False)
    assert list(outcome.failed) == [(0, "_test_fails_round2")]
    assert "deliberate failure" in outcome.failed[(0, "_test_fails_round2")]
    res = CliRunner().invoke(main, ["report", str(tmp_path / "exp"), "--json"])
    s = json.loads(res.output)["strategies"]["_test_fails_round2"]
    assert s["runs"] == 0 and "0" in s["failed_runs"] and "deliberate failure" in s["failed_runs"]["0"]
    assert s["accuracy_mean"][2] is None and s["accuracy_mean"][3] is None  # missing, never zero
    assert s["accuracy_mean"][1] is not None
    text = CliRunner().invoke(main, ["report", str(tmp_path / "exp")]).output
    assert "run 0 FAILED: RuntimeError: deliberate failure" in text and "missing" in text


def read_store(exp_dir: Path, sql: str) -> list[tuple]:
    """Rows of ``sql`` on an experiment's store as it is now, opened read-only: a run may be creating the file
    at this moment, and a plain connect would make an empty file that the run then refuses as damaged. No rows
    while the store or its tables do not exist yet."""
    path = exp_dir / "results.sqlite"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30) as c:
            return c.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def _rounds_done(exp_dir: Path) -> int:
    rows = read_store(exp_dir, "SELECT COUNT(*) FROM rounds")
    return rows[0][0] if rows else 0


# Kills at random moments of a --workers 2 experiment, with the resume compared with an uninterrupted run:
# tests/test_reliability.py::test_sigkill_at_random_moments_with_two_workers_and_four_strategies.


def test_parallel_workers_match_sequential(tmp_path):
    cfg = {**TINY, "loop": {**TINY["loop"], "rounds": 2}}
    cfg_path = write_config(tmp_path / "tiny.yaml", cfg)
    run_experiment(cfg_path, tmp_path / "seq", progress=False)
    out = run_experiment(cfg_path, tmp_path / "par", workers=2, progress=False)
    assert not out.failed
    assert snapshot(tmp_path / "seq") == snapshot(tmp_path / "par")


def test_runs_option_selects_runs(tmp_path):
    cfg_path = write_config(tmp_path / "tiny.yaml", {**TINY, "loop": {**TINY["loop"], "rounds": 1}})
    out = run_experiment(cfg_path, tmp_path / "exp", runs="1:2", progress=False)
    assert sorted(out.done) == [(1, "entropy"), (1, "random")]
    res = CliRunner().invoke(main, ["run", str(cfg_path), "--out", str(tmp_path / "exp"), "--runs", "0:9"])
    assert res.exit_code == 2 and "outside the config's 2 runs" in res.output


@register
class _Ensemble3(Strategy):
    """Test-only strategy: asks the runner for a 3-model ensemble and checks what it gets."""

    name = "_test_ensemble3"
    seen: list = []

    def ensemble_size(self) -> int:
        return 3

    def query(self, ctx, budget, rng):
        members = ctx.ensemble_models
        assert members is not None and len(members) == 3 and members[0] is ctx.model
        dataset, idx = ctx.dataset("candidates")
        x, _ = dataset.batch(idx[:16])
        with torch.no_grad():
            outs = [m.eval()(x) for m in members]
        type(self).seen.append(all(not torch.allclose(outs[0], o) for o in outs[1:]))
        return rng.choice(len(ctx.candidates), budget, replace=False)


def test_ensemble_members_are_trained_and_resumed(tmp_path):
    cfg = {**TINY, "loop": {**TINY["loop"], "runs": 1, "rounds": 2}, "strategies": [{"name": "_test_ensemble3"}]}
    cfg_path = write_config(tmp_path / "e.yaml", cfg)
    _Ensemble3.seen.clear()
    assert not run_experiment(cfg_path, tmp_path / "exp", progress=False).failed
    assert _Ensemble3.seen == [True, True]  # distinct members in both selection rounds
    folder = tmp_path / "exp/models/run0/_test_ensemble3"
    assert sorted(p.name for p in folder.glob("round2*.pt")) == ["round2.pt", "round2_member1.pt", "round2_member2.pt"]
    before = snapshot(tmp_path / "exp")
    with sqlite3.connect(tmp_path / "exp/results.sqlite") as c:
        c.execute("DELETE FROM rounds WHERE round = 2")
    assert not run_experiment(cfg_path, tmp_path / "exp", progress=False).failed
    assert snapshot(tmp_path / "exp") == before  # members reloaded from their checkpoints on resume


def test_class_subset_with_counts_bias(tmp_path):
    cfg = {
        **TINY,
        "dataset": {"name": "digits", "classes": [3, 1, 4, 0]},
        "bias": {"kind": "counts", "counts": {0: 20, 1: 100, 2: 20, 3: 20}},
        "validation": {"per_class": 5},
        "loop": {**TINY["loop"], "runs": 1, "rounds": 1},
        "strategies": [{"name": "margin"}],
    }
    assert not run_experiment(write_config(tmp_path / "c.yaml", cfg), tmp_path / "exp", progress=False).failed
    _, store = load_experiment(tmp_path / "exp")
    info = store.runs()[0]
    assert info["class_counts"] == {0: 20, 1: 100, 2: 20, 3: 20}
    assert info["minority"] == [0, 2, 3]
    rec = store.rounds(strategy="margin")[-1]
    assert len(rec.per_class_recall) == 4 and len(rec.test_predictions) == 200  # 50 test images per class
    store.close()
