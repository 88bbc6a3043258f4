"""Reliability: no silent wrong results, one writer per experiment, identical numerics whatever the parallelism,
safe loading, damaged files named, and everything checkable checked before the first job."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from activelab.cli import main
from activelab.config import ConfigError, load_config
from activelab.data.contract import check_dataset_item, check_model_and_data, check_model_output
from activelab.data.indices import as_pool_indices
from activelab.errors import ActivelabError, ExperimentBusyError, StopRound
from activelab.experiment.job import check_finite_training
from activelab.experiment.layout import Layout
from activelab.experiment.runner import experiment_lock, load_experiment, run_experiment
from activelab.experiment.store import Store
from activelab.train.base import TrainResult

MINI = {
    "name": "mini",
    "dataset": {"name": "digits"},
    "model": {"name": "digits_cnn"},
    "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 32, "epochs": 1},
    "loop": {"initial": 10, "budget": 10, "rounds": 2, "runs": 1, "seed": 3},
    "threads": 1,
    "strategies": [{"name": "random"}, {"name": "entropy"}],
}


def _cfg(**over) -> dict:
    out = json.loads(json.dumps(MINI))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(exp_dir: Path) -> dict:
    cfg, store = load_experiment(exp_dir)
    out = {
        (r.run, r.strategy, r.round): (r.selected.tolist(), r.test_predictions.tolist(), r.n_labeled)
        for r in store.rounds()
    }
    store.close()
    for p in sorted((exp_dir / "models").rglob("round*.pt")):
        out[str(p.relative_to(exp_dir))] = [v.numpy().tolist() for v in torch.load(p, weights_only=True).values()]
    return out


# --- 1. divergence -------------------------------------------------------------------------------------------


def test_non_finite_weights_or_loss_stop_the_round_naming_the_learning_rate():
    model = nn.Linear(3, 2)
    ok = TrainResult(epochs=1, seconds=0, eval_seconds=0, train_accuracy=1, val_accuracy=None, selected_epoch=1)
    check_finite_training(model, ok, "run 0, x, round 2", 0.1)
    bad_loss = TrainResult(1, 0, 0, 1, None, 1, history=[{"loss": float("nan")}])
    with pytest.raises(StopRound, match=r"round 2: training diverged \(the training loss became nan\).*train.lr = 5"):
        check_finite_training(model, bad_loss, "run 0, x, round 2", 5)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(StopRound, match="non-finite weights in weight"):
        check_finite_training(model, ok, "run 0, x, round 2", 5)


def test_a_diverged_job_fails_and_is_never_reported_as_a_result(tmp_path):
    cfg = _cfg(train={"optimizer": "sgd", "lr": 1e20, "momentum": 0.9}, loop={"rounds": 1})
    out = run_experiment(_write(tmp_path / "c.yaml", cfg), tmp_path / "exp", progress=False)
    assert sorted(out.failed) == [(0, "entropy"), (0, "random")]  # each job tried, each failed on its own
    assert all("diverged" in e and "train.lr = 1e+20" in e and "round 0" in e for e in out.failed.values())
    res = CliRunner().invoke(main, ["report", str(tmp_path / "exp"), "--json"])
    rep = json.loads(res.output)["strategies"]["random"]
    assert rep["aubc"] is None and rep["accuracy_mean"] == [None, None] and "0" in rep["failed_runs"]


# --- 2. numerics independent of the parallelism ------------------------------------------------------------


def test_sequential_workers_and_resume_with_other_workers_are_bit_identical(tmp_path):
    """Run 0 with two worker processes side by side, then run 1 resumed sequentially, equals a sequential run."""
    cfg = _cfg(loop={"runs": 2, "rounds": 1})
    del cfg["threads"]  # the default thread count must not depend on --workers
    path = _write(tmp_path / "c.yaml", cfg)
    run_experiment(path, tmp_path / "seq", progress=False)
    assert not run_experiment(path, tmp_path / "mixed", runs="0:1", workers=2, progress=False).failed
    assert not run_experiment(path, tmp_path / "mixed", workers=1, progress=False).failed
    assert snapshot(tmp_path / "seq") == snapshot(tmp_path / "mixed")
    with Store(tmp_path / "mixed/results.sqlite", readonly=True) as s:
        assert int(s.get_meta("threads")) == min(4, os.cpu_count() or 1)


def test_a_changed_thread_count_warns_and_keeps_the_stored_one(tmp_path):
    path = _write(tmp_path / "c.yaml", _cfg(loop={"rounds": 1}, strategies=[{"name": "random"}]))
    run_experiment(path, tmp_path / "exp", progress=False)
    more = _write(tmp_path / "d.yaml", _cfg(loop={"rounds": 1}, strategies=[{"name": "random"}], threads=2))
    with pytest.warns(UserWarning, match="threads: 2 is not used"):
        out = run_experiment(more, tmp_path / "exp", progress=False)
    assert any("threads" in w for w in out.warnings)


# --- 3. one writer per experiment ------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    path = _write(tmp_path / "c.yaml", _cfg(loop={"rounds": 1}, strategies=[{"name": "random"}]))
    run_experiment(path, tmp_path / "exp", progress=False)
    with experiment_lock(Layout(tmp_path / "exp")):
        with pytest.raises(ExperimentBusyError, match=rf"pid {os.getpid()} on host"):
            run_experiment(path, tmp_path / "exp", progress=False)
        res = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "exp"), "--quiet"])
        assert res.exit_code == 2 and "is being run by another activelab process" in res.output
    assert run_experiment(path, tmp_path / "exp", progress=False).skipped  # the lock is released


def test_job_status_is_repaired_and_temp_files_cleaned(tmp_path):
    path = _write(tmp_path / "c.yaml", _cfg(loop={"rounds": 1}))
    run_experiment(path, tmp_path / "exp", progress=False)
    exp = tmp_path / "exp"
    with sqlite3.connect(exp / "results.sqlite") as c:
        c.execute("UPDATE jobs SET status = 'failed' WHERE strategy = 'random'")  # complete, marked failed
        c.execute("UPDATE jobs SET status = 'running', pid = 999999999 WHERE strategy = 'entropy'")
        c.execute("DELETE FROM rounds WHERE strategy = 'entropy' AND round = 1")
    stray = exp / "models/run0/random/.round1.pt.12345.tmp"
    stray.write_bytes(b"partial")
    text = CliRunner().invoke(main, ["report", str(exp)]).output
    assert "run 0 incomplete: interrupted" in text
    out = run_experiment(path, exp, progress=False)
    assert out.done == [(0, "entropy")] and not stray.exists()
    with Store(exp / "results.sqlite", readonly=True) as s:
        assert {k: v[0] for k, v in s.jobs().items()} == {(0, "random"): "done", (0, "entropy"): "done"}


# --- 4. labeled indices ------------------------------------------------------------------------------------------


def test_labeled_indices_mask_float_and_duplicates():
    assert as_pool_indices(None, 5).tolist() == [] and as_pool_indices([], 5).tolist() == []
    assert as_pool_indices(np.array([False, True, False, True, False]), 5).tolist() == [1, 3]
    assert as_pool_indices([4, 0], 5).tolist() == [4, 0]
    with pytest.raises(ActivelabError, match="boolean mask of length 3 but the pool has 5"):
        as_pool_indices([True, False, True], 5)
    with pytest.raises(ActivelabError, match="integer pool indices.*float64"):
        as_pool_indices([1.0, 2.0], 5)
    with pytest.raises(ActivelabError, match=r"repeated indices \(e.g. \[2\]\)"):
        as_pool_indices([2, 1, 2], 5)
    with pytest.raises(ActivelabError, match=r"lie in \[0, 5\)"):
        as_pool_indices([5], 5)
    with pytest.raises(ActivelabError, match="1-D"):
        as_pool_indices([[1, 2]], 5)


# --- 5 / 13. safe loading, damaged checkpoints --------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_damaged_or_crafted_checkpoint_is_named_and_recovery_recomputes_identically(tmp_path):
    path = _write(tmp_path / "c.yaml", _cfg(strategies=[{"name": "entropy"}]))
    run_experiment(path, tmp_path / "ref", progress=False)
    reference = snapshot(tmp_path / "ref")
    exp = tmp_path / "exp"
    run_experiment(path, exp, progress=False)
    with sqlite3.connect(exp / "results.sqlite") as c:  # as if killed before round 2 was committed
        c.execute("DELETE FROM rounds WHERE round = 2")
    ckpt = Layout(exp).checkpoint(0, "entropy", 1)
    marker = tmp_path / "code-ran"
    torch.save({"w": _Evil(marker)}, ckpt)
    out = run_experiment(path, exp, progress=False)
    (error,) = out.failed.values()
    assert str(ckpt) in error and "is damaged" in error and "Delete it and run again" in error
    assert not marker.exists()
    ckpt.unlink()  # what the message says: round 1 is recomputed from round 0, checked, then round 2
    assert not run_experiment(path, exp, progress=False).failed
    assert snapshot(exp) == reference


# --- 6. the store through the CLI ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    cfg = _cfg(loop={"runs": 2, "target_accuracy": 0.2})
    run_experiment(_write(tmp / "c.yaml", cfg), tmp / "exp", progress=False)
    return tmp / "exp"


def test_report_and_plot_on_a_read_only_archive(finished, tmp_path, monkeypatch):
    import shutil

    from activelab.experiment import store as store_mod

    archive = tmp_path / "archive"
    shutil.copytree(finished, archive, ignore=shutil.ignore_patterns("*-wal", "*-shm", ".lock"))
    digest = (archive / "results.sqlite").read_bytes()
    monkeypatch.setattr(store_mod, "can_write", lambda path: False)  # the tests may run as root
    res = CliRunner().invoke(main, ["report", str(archive), "--json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["plot", str(archive), "--out", str(tmp_path / "fig")])
    assert res.exit_code == 0, res.output
    assert (archive / "results.sqlite").read_bytes() == digest


@pytest.mark.parametrize("content", [b"", b"garbage" * 100])
def test_report_on_a_damaged_store_names_the_file(finished, tmp_path, content):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(finished, broken, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    (broken / "results.sqlite").write_bytes(content)
    res = CliRunner().invoke(main, ["report", str(broken)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert str(broken / "results.sqlite") in res.output and "restore it from a backup" in res.output


# --- issue 10: report --target ---------------------------------------------------------------------------------


def test_report_target_labels_header_never_marker_and_json(finished):
    res = CliRunner().invoke(main, ["report", str(finished), "--target", "0.99"])
    assert res.exit_code == 0
    assert "labels@99%" in res.output and "labels@20%" not in res.output and "never" in res.output
    rep = json.loads(CliRunner().invoke(main, ["report", str(finished), "--json", "--target", "0.99"]).output)
    assert rep["target_accuracy"] == 0.99
    assert all(s["labels_to_target"] is None for s in rep["strategies"].values())


def test_summary_averages_the_same_runs_at_every_round(finished, tmp_path):
    import shutil

    exp = tmp_path / "exp"
    shutil.copytree(finished, exp, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    with sqlite3.connect(exp / "results.sqlite") as c:  # run 1 of entropy lost its last round
        c.execute("DELETE FROM rounds WHERE run = 1 AND strategy = 'entropy' AND round = 2")
    rep = json.loads(CliRunner().invoke(main, ["report", str(exp), "--json"]).output)["strategies"]["entropy"]
    with Store(exp / "results.sqlite", readonly=True) as s:
        run0 = [r.accuracy for r in s.rounds(run=0, strategy="entropy")]
    assert rep["runs_per_round"] == [1, 1, 1] and rep["accuracy_mean"] == pytest.approx(run0)
    assert rep["incomplete_runs"] == [1]


# --- 7. the recorded config --------------------------------------------------------------------------------------


def test_an_edited_stored_config_is_refused_everywhere(finished, tmp_path):
    import shutil

    exp = tmp_path / "exp"
    shutil.copytree(finished, exp, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    text = (exp / "config.yaml").read_text()
    (exp / "config.yaml").write_text(text.replace("lr: 0.003", "lr: 0.01"))
    res = CliRunner().invoke(main, ["report", str(exp)])
    assert res.exit_code == 2 and "was edited after results were recorded" in res.output
    assert "train.lr: 0.003 (recorded) vs 0.01 (in config.yaml)" in res.output
    res = CliRunner().invoke(main, ["run", str(exp / "config.yaml"), "--out", str(exp), "--quiet"])
    assert res.exit_code == 2 and "was edited after results were recorded" in res.output


# --- issue 10: growing an experiment, changed non-result keys ------------------------------------------------------


def test_adding_a_strategy_to_a_finished_experiment(tmp_path):
    one = _cfg(strategies=[{"name": "random"}])
    two = _cfg(strategies=[{"name": "random"}, {"name": "margin"}])
    run_experiment(_write(tmp_path / "one.yaml", one), tmp_path / "exp", progress=False)
    before = snapshot(tmp_path / "exp")
    out = run_experiment(_write(tmp_path / "two.yaml", two), tmp_path / "exp", progress=False)
    assert out.done == [(0, "margin")] and out.skipped == [(0, "random")]
    run_experiment(tmp_path / "two.yaml", tmp_path / "fresh", progress=False)
    after = snapshot(tmp_path / "exp")
    assert after == snapshot(tmp_path / "fresh") and all(after[k] == v for k, v in before.items())
    assert [s.label for s in load_config(tmp_path / "exp/config.yaml").strategies] == ["random", "margin"]
    dropped = _cfg(strategies=[{"name": "margin"}, {"name": "entropy"}])
    with pytest.raises(ConfigError, match=r"keep its strategies in the config too: \['random'\]"):
        run_experiment(_write(tmp_path / "three.yaml", dropped), tmp_path / "exp", progress=False)
    renamed = _cfg(name="other", strategies=[{"name": "random"}, {"name": "margin"}])
    with pytest.warns(UserWarning, match=r"keeps its stored config.*name: 'mini' \(stored\) vs 'other'"):
        run_experiment(_write(tmp_path / "four.yaml", renamed), tmp_path / "exp", progress=False)


# --- 8. checked before the first job -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"dataset": {"name": "nope"}}, "unknown dataset 'nope'"),
        ({"loop": {"budget": 5000}}, "lower the budget or the rounds"),
        ({"device": "cuda:7"}, "cuda"),
        ({"loop": {"seed": -1}}, "loop.seed"),
        ({"dataset": {"name": "digits", "classes": [0, 12]}}, r"dataset.classes \[12\] do not exist"),
        ({"strategies": [{"name": "entropy", "params": {"k": 1}}]}, "Valid parameters"),
        ({"strategies": [{"name": "no_such_module:thing"}]}, "no_such_module"),
    ],
)
def test_bad_configs_fail_before_any_directory_exists(tmp_path, over, message):
    path = _write(tmp_path / "c.yaml", _cfg(**over))
    res = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "exp"), "--quiet"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and "Traceback" not in res.output
    assert __import__("re").search(message, res.output), res.output
    assert not (tmp_path / "exp").exists()


# --- 9. duplicate YAML keys ----------------------------------------------------------------------------------------


def test_duplicate_keys_are_rejected_naming_the_lines(tmp_path):
    text = yaml.safe_dump(MINI, sort_keys=False) + "train:\n  epochs: 3\n"
    (tmp_path / "c.yaml").write_text(text)
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("train:"))
    last = len(text.splitlines()) - 1
    with pytest.raises(
        ConfigError, match=rf"key 'train' appears twice in one mapping \(line {first} and line {last}\)"
    ):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("name: a\nloop:\n  budget: 1\n  budget: 2\n")
    with pytest.raises(ConfigError, match=r"'budget' appears twice.*line 3 and line 4"):
        load_config(tmp_path / "d.yaml")


# --- 10. the model / dataset contract ------------------------------------------------------------------------------


class _OneD(nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)


class _XOnly(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.zeros(1, 8, 8)


def test_model_and_dataset_contracts_are_named_on_the_first_batch():
    from activelab.data.arrays import ArrayDataset

    pool = ArrayDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), [0, 1, 0, 1])
    with pytest.raises(ActivelabError, match=r"2-D float tensor \(batch, classes\).*shape \(2,\)"):
        check_model_and_data(_OneD(), pool)
    with pytest.raises(ActivelabError, match=r"items are \(x, y\) pairs.*item 0 is a Tensor"):
        check_dataset_item(_XOnly())
    with pytest.raises(ActivelabError, match="dtype torch.int64"):
        check_model_output(torch.zeros(2, 3, dtype=torch.int64), 2)
    with pytest.raises(ActivelabError, match="returns 3 logits per sample but the data has 4 classes"):
        check_model_output(torch.zeros(2, 3), 2, num_classes=4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).train()
    check_model_and_data(model, pool, num_classes=2)
    assert model.training


# --- 11. the dataset folder is recorded ----------------------------------------------------------------------------


def test_the_dataset_folder_used_is_recorded(finished):
    with Store(finished / "results.sqlite", readonly=True) as s:
        assert s.run_record(0).data_root == "scikit-learn"


# --- issue 13: the initial models are made once, by one process, whatever the executor --------------------------


def test_leases_block_live_holders_and_take_over_dead_ones(tmp_path):
    import socket
    import threading
    import time

    from activelab.experiment import lease

    host = socket.gethostname()
    with Store(tmp_path / "results.sqlite", create=True) as s:
        assert s.try_lease("a", "one", os.getpid(), host, lease.is_stale) is None
        assert s.try_lease("a", "two", os.getpid(), host, lease.is_stale).owner == "one"  # alive: kept
        assert s.try_lease("b", "one", 2**22 + 12345, host, lease.is_stale) is None
        assert s.try_lease("b", "two", os.getpid(), host, lease.is_stale) is None  # dead pid: taken over
        assert s.try_lease("c", "one", os.getpid(), "elsewhere", lease.is_stale) is None
        s.conn.execute("UPDATE leases SET heartbeat = heartbeat - 1000 WHERE name = 'c'")
        assert s.try_lease("c", "two", os.getpid(), host, lease.is_stale) is None  # silent other host: stale
    made, done = [], threading.Event()

    def worker() -> None:
        with lease.holding_lease(tmp_path / "results.sqlite", "init", done=done.is_set) as mine:
            if mine and not done.is_set():
                time.sleep(0.3)
                made.append(1)
                done.set()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [1]


# --- issue 10: imports that run back up ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("activelab.config", "activelab.strategies"),
        ("activelab.experiment.job", "activelab.report"),
        ("activelab.data.bias", "activelab.config"),
        ("activelab.metrics", "activelab.experiment"),
    ],
)
def test_lower_layers_do_not_import_upper_ones(module, forbidden):
    """Direct imports (module level and inside functions) read from the source: the package's own __init__
    imports the public API, so sys.modules cannot tell."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    package = module.rsplit(".", 1)[0]
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = (
                importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                if node.level
                else node.module
            )
            imported += [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
    assert not [m for m in imported if m == forbidden or m.startswith(forbidden + ".")]


# --- the permanent kill campaign ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_with_two_workers_and_four_strategies(tmp_path):
    """The harness of benchmarks/bench_kill_resume.py with a handful of kills; the reference is sequential."""
    import importlib.util

    path = Path(__file__).parent.parent / "benchmarks" / "bench_kill_resume.py"
    spec = importlib.util.spec_from_file_location("bench_kill_resume", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tally = bench.kill_and_resume(tmp_path, kills=3, workers=2, seed=1, log=lambda line: None)
    assert tally["kills"] >= 1 and tally["identical"], tally
