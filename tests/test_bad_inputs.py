"""A catalogue of bad inputs, tried as a new user would: each gives one ``error:`` line without a traceback and
exit status 2 (usage errors) or 1 (a run whose jobs failed), and nothing recorded before is lost or changed."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from activelab.cli import main
from activelab.experiment.runner import run_experiment
from activelab.strategies.base import Strategy, register

BASE = {
    "name": "bad",
    "dataset": {"name": "digits"},
    "model": {"name": "digits_cnn"},
    "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 32, "epochs": 1},
    "loop": {"initial": 10, "budget": 10, "rounds": 1, "runs": 1, "seed": 1},
    "threads": 1,
    "strategies": [{"name": "random"}],
}


def _with(**over) -> dict:
    cfg = json.loads(json.dumps(BASE))
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def _yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "base.yaml").write_text(_yaml(BASE))
    assert not run_experiment(tmp / "base.yaml", tmp / "exp", progress=False).failed
    return tmp / "exp"


def _digest(exp: Path) -> dict[str, str]:
    """What is recorded: every round, run and meta row, the config and the models (not timestamps of jobs)."""
    out = {}
    with sqlite3.connect(f"file:{exp / 'results.sqlite'}?mode=ro", uri=True) as c:
        for table in ("rounds", "runs", "meta"):
            rows = c.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            out[table] = hashlib.sha256(repr(rows).encode()).hexdigest()
    out["config"] = hashlib.sha256((exp / "config.yaml").read_bytes()).hexdigest()
    for p in sorted((exp / "models").rglob("*.pt")):
        out[str(p.relative_to(exp))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _check(res, code: int = 2, needle: str | None = None) -> None:
    text = res.stderr if res.stderr else res.output
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    error_lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, text
    assert text.startswith("error:"), text
    if needle:
        assert needle in text, text


# (file text, where the config goes, expected words)
LIMIT_9 = {"max_points": 9}
CONFIG_CASES = [
    ("", "top level must be a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
    ("\x00\x01\x02binary", "config"),
    (_yaml(BASE) + "train:\n  epochs: 2\n", "appears twice"),
    (_yaml(_with(train={"lrr": 0.1})), "train.lrr: unknown key"),
    (_yaml(_with(model={"name": "vgg"})), "model.name"),
    (_yaml(_with(strategies=[{"name": "nope"}])), "unknown strategy 'nope'"),
    (_yaml(_with(strategies=[{"name": "entropy", "params": {"k": 1}}])), "Valid parameters"),
    (_yaml(_with(strategies=[])), "strategies"),
    (_yaml(_with(strategies=[{"name": "random"}, {"name": "random"}])), "appear twice"),
    (_yaml(_with(loop={"seed": -3})), "loop.seed"),
    (_yaml(_with(loop={"budget": 0})), "loop.budget"),
    (_yaml(_with(loop={"budget": 5000})), "lower the budget or the rounds"),
    (_yaml(_with(dataset={"name": "nope"})), "unknown dataset 'nope'"),
    (_yaml(_with(dataset={"name": "mnist", "root": "/nonexistent/folder", "download": False})), "dataset.root"),
    (_yaml(_with(dataset={"name": "digits", "classes": [0, 99]})), "do not exist"),
    (_yaml(_with(device="cuda:5")), "cuda"),
    (_yaml(_with(bias={"kind": "step", "ratio": 0.5})), "bias.ratio"),
    (_yaml(_with(train={"select_by": "validation"})), "validation.per_class > 0"),
    # size limits are checked before any training (the pool here has a few hundred images)
    (_yaml(_with(strategies=[{"name": "probcover", "params": {"max_points": 50}}])), "labeled + candidate points"),
    (_yaml(_with(strategies=[{"name": "batchbald", "params": {"max_candidates": 20}}])), "batchbald over N="),
    (_yaml(_with(strategies=[{"name": "bengar", "params": {"max_candidates": 20}}])), "bengar: the LP over N="),
    (
        _yaml(_with(strategies=[{"name": "margin", "first_round": {"name": "probcover", "params": LIMIT_9}}])),
        "probcover over N=",
    ),
]


@pytest.mark.parametrize(("text", "needle"), CONFIG_CASES, ids=range(len(CONFIG_CASES)))
def test_bad_config_is_one_error_line_and_leaves_no_directory(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
    res = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "exp"), "--quiet"])
    _check(res, 2, needle)
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "missing.yaml"], "does not exist"),
        (["run", "{dir}"], "is a directory"),
        (["run", "{base}", "--workers", "0"], "--workers"),
        (["run", "{base}", "--runs", "0:9", "--out", "{tmp}/x"], "outside the config's 1 runs"),
        (["run", "{base}", "--runs", "zero", "--out", "{tmp}/x"], "--runs takes A:B"),
        (["run", "{base}", "--out", "{file}"], "is a file"),
        (["run", "{base}", "--out", "{file}/sub"], "needs a writable experiment directory"),
        (["run", "{base}", "--address", "auto"], "options of --executor ray"),
        (["report", "{tmp}"], "is not an experiment directory"),
        (["report", "{tmp}/nowhere"], "does not exist"),
        (["report", "{exp}", "--target", "2"], "--target"),
        (["plot", "{exp}", "--strategies", "nope", "--out", "{tmp}/f"], "unknown strategies ['nope']"),
        (["plot", "{exp}", "--confusion", "7", "--out", "{tmp}/f"], "no completed round 7"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_bad_command_lines(experiment, tmp_path, args, needle):
    (tmp_path / "d").mkdir()
    (tmp_path / "file").write_text("x")
    base = experiment.parent / "base.yaml"
    fill = {"dir": str(tmp_path / "d"), "base": str(base), "tmp": str(tmp_path), "file": str(tmp_path / "file")}
    fill["exp"] = str(experiment)
    before = _digest(experiment)
    res = CliRunner().invoke(main, [a.format(**fill) for a in args])
    _check(res, 2, needle)
    assert _digest(experiment) == before


def _copy(experiment: Path, tmp_path: Path) -> Path:
    exp = tmp_path / "exp"
    shutil.copytree(experiment, exp, ignore=shutil.ignore_patterns("*-wal", "*-shm", ".lock"))
    return exp


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda e: (e / "results.sqlite").write_bytes(b""), "is empty"),
        (lambda e: (e / "results.sqlite").write_bytes(b"not sqlite" * 50), "is not an SQLite file"),
        (lambda e: (e / "results.sqlite").unlink(), "not an experiment directory"),
        (
            lambda e: (
                sqlite3.connect(e / "results.sqlite")
                .execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
                .connection.commit()
            ),
            "newer activelab",
        ),
        (
            lambda e: (e / "config.yaml").write_text((e / "config.yaml").read_text().replace("epochs: 1", "epochs: 4")),
            "was edited after results were recorded",
        ),
        (lambda e: (e / "config.yaml").write_text("name: [\n"), "not valid YAML"),
    ],
    ids=["empty", "not-sqlite", "no-store", "newer-schema", "edited-config", "broken-config"],
)
def test_damaged_experiments_are_named_by_every_command(experiment, tmp_path, damage, needle):
    exp = _copy(experiment, tmp_path)
    damage(exp)

    def files() -> dict[str, bytes]:  # SQLite's own -wal / -shm files and the lock file may change
        return {
            p.name: p.read_bytes()
            for p in exp.iterdir()
            if p.is_file() and p.suffix == ".yaml" or p.name.endswith(".sqlite")
        }

    snapshot = files()
    for args in (["report", str(exp)], ["plot", str(exp), "--out", str(tmp_path / "f")]):
        _check(CliRunner().invoke(main, args), 2, needle)
    res = CliRunner().invoke(main, ["run", str(experiment.parent / "base.yaml"), "--out", str(exp), "--quiet"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert files() == snapshot


@register
class _Boom(Strategy):
    """Test-only: fails in its first selection."""

    name = "_test_boom"

    def query(self, ctx, budget, rng):
        raise RuntimeError("boom")


def test_a_failed_run_exits_1_and_keeps_what_was_recorded(experiment, tmp_path):
    """A strategy added to the finished experiment fails; the recorded one is untouched."""
    exp = _copy(experiment, tmp_path)
    before = _digest(exp)
    (tmp_path / "g.yaml").write_text(_yaml(_with(strategies=[{"name": "random"}, {"name": "_test_boom"}])))
    res = CliRunner().invoke(main, ["run", str(tmp_path / "g.yaml"), "--out", str(exp), "--quiet"])
    assert res.exit_code == 1 and "FAILED run 0 _test_boom" in res.output and "boom" in res.output
    after = _digest(exp)
    assert after["rounds"] != before["rounds"]  # round 0 of the new strategy was recorded ...
    with sqlite3.connect(exp / "results.sqlite") as c:
        kept = c.execute("SELECT COUNT(*) FROM rounds WHERE strategy = 'random'").fetchone()[0]
    assert kept == 2  # ... and the finished strategy's rounds are all still there
    assert {k: v for k, v in after.items() if k.startswith("models/run0/random")} == {
        k: v for k, v in before.items() if k.startswith("models/run0/random")
    }
