"""The results store: one record definition, schema version and migration, read-only opening, damage."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3

import numpy as np
import pytest

from activelab.experiment import store as store_mod
from activelab.experiment.store import (
    ROUNDS,
    SCHEMA_VERSION,
    RoundRecord,
    Store,
    StoreError,
    jsonable,
)

# The first store's schema, verbatim (no version in meta): a store made by activelab before schema 2.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY, pool_size INTEGER NOT NULL, class_counts TEXT NOT NULL,
    minority TEXT NOT NULL, pool_indices BLOB NOT NULL, validation_indices BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    run INTEGER NOT NULL, strategy TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
    updated REAL NOT NULL, PRIMARY KEY (run, strategy)
);
CREATE TABLE IF NOT EXISTS rounds (
    run INTEGER NOT NULL, strategy TEXT NOT NULL, round INTEGER NOT NULL,
    n_labeled INTEGER NOT NULL, accuracy REAL NOT NULL, balanced_accuracy REAL NOT NULL,
    minority_recall REAL, per_class_recall TEXT NOT NULL, labeled_per_class TEXT NOT NULL,
    select_seconds REAL NOT NULL, train_seconds REAL NOT NULL, eval_seconds REAL NOT NULL,
    epochs INTEGER NOT NULL, val_accuracy REAL, info TEXT NOT NULL,
    selected BLOB NOT NULL, test_predictions BLOB NOT NULL,
    PRIMARY KEY (run, strategy, round)
);
"""


def _record(round_: int = 1, **kw) -> RoundRecord:
    base = dict(
        run=0,
        strategy="random",
        round=round_,
        n_labeled=20,
        accuracy=0.5,
        balanced_accuracy=0.4,
        minority_recall=None,
        per_class_recall=[0.5, float("nan")],
        labeled_per_class=[15, 5],
        select_seconds=0.1,
        train_seconds=1.0,
        eval_seconds=0.2,
        epochs=3,
        val_accuracy=0.6,
        selected=np.array([3, 1, 4]),
        test_predictions=np.array([0, 1, 1, 0]),
        info={"k": 1},
    )
    base.update(kw)
    return RoundRecord(**base)


def _v1_store(path) -> None:
    with sqlite3.connect(path) as c:
        c.executescript(V1_SCHEMA)
        c.execute("INSERT INTO meta VALUES ('fingerprint', 'abc')")
        c.execute(
            "INSERT INTO rounds VALUES (0, 'random', 0, 10, 0.5, 0.5, NULL, '[0.5, 0.5]', '[5, 5]', 0.1, 0.2, 0.0, 3, "
            "NULL, '{}', ?, ?)",
            (store_mod.to_blob(np.arange(3)), store_mod.to_blob(np.zeros(4, np.int16))),
        )


def test_table_derives_from_the_record_fields():
    names = [f.name for f in dataclasses.fields(RoundRecord)]
    assert [c.name for c in ROUNDS.columns] == names
    ddl = ROUNDS.ddl()
    for name in names:
        assert f" {name} " in ddl or f"({name} " in ddl
    assert "macro_f1 REAL," in ddl and "accuracy REAL NOT NULL" in ddl
    assert ROUNDS.insert_sql().count("?") == len(names)


def test_round_trip_with_new_fields(tmp_path):
    with Store(tmp_path / "r.sqlite", create=True) as s:
        rec = _record(selected_per_class=[2, 1], macro_f1=0.3, worst_class_recall=0.1, classes_labeled=2)
        s.put_round(rec)
        (back,) = s.rounds()
        assert s.schema_version == SCHEMA_VERSION
    assert back.selected.tolist() == [3, 1, 4] and back.test_predictions.dtype == np.int16
    assert back.selected_per_class == [2, 1] and back.macro_f1 == 0.3 and back.classes_labeled == 2
    assert back.minority_label_share is None and np.isnan(back.per_class_recall[1])


def test_non_json_round_info_is_sanitised_not_fatal(tmp_path):
    info = {"np": np.float32(0.5), "arr": np.arange(3), "obj": object(), "nested": {1: (np.int64(2),)}}
    with Store(tmp_path / "r.sqlite", create=True) as s:
        s.put_round(_record(info=info))
        (back,) = s.rounds()
    assert back.info["np"] == 0.5 and back.info["arr"] == [0, 1, 2]
    assert back.info["obj"].startswith("<object object") and back.info["nested"] == {"1": [2]}
    assert jsonable({"a": {np.bool_(True)}}) == {"a": [True]}


def test_v1_store_is_migrated_in_place(tmp_path):
    path = tmp_path / "results.sqlite"
    _v1_store(path)
    with Store(path, readonly=True) as s:  # reading does not migrate, and reads the old rows
        assert s.schema_version == 1
        (rec,) = s.rounds()
        assert rec.macro_f1 is None and rec.selected_per_class is None
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert s.get_meta("fingerprint") == "abc"
        (rec,) = s.rounds()
        assert rec.n_labeled == 10 and rec.macro_f1 is None
        s.put_round(_record(round_=1, macro_f1=0.25))
        assert [r.macro_f1 for r in s.rounds()] == [None, 0.25]
    with sqlite3.connect(path) as c:
        cols = {r[1] for r in c.execute("PRAGMA table_info(rounds)")}
        assert {"macro_f1", "selected_per_class", "minority_label_share"} <= cols


def test_newer_store_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "results.sqlite"
    Store(path, create=True).close()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    for readonly in (False, True):
        with pytest.raises(StoreError, match=r"newer activelab \(store schema 99.*upgrade activelab"):
            Store(path, readonly=readonly)


def test_unknown_version_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    Store(path, create=True).close()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE meta SET value = 'x1' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="unknown store schema version"):
        Store(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"this is not a database" * 10, "is not an SQLite file")],
)
def test_damaged_file_names_the_file_and_what_to_do(tmp_path, content, message):
    path = tmp_path / "results.sqlite"
    path.write_bytes(content)
    for readonly in (False, True):
        with pytest.raises(StoreError, match=message) as err:
            Store(path, readonly=readonly)
        assert str(path) in str(err.value) and "restore it from a backup" in str(err.value)
    assert path.read_bytes() == content  # never overwritten


def test_corrupt_pages_name_the_file(tmp_path):
    path = tmp_path / "results.sqlite"
    with Store(path, create=True) as s:
        for k in range(40):
            s.put_round(_record(round_=k, test_predictions=np.zeros(2000)))
        s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[4096:] = b"\xff" * (len(data) - 4096)  # keep the header page, ruin the rest
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="results.sqlite"):
        with Store(path, readonly=True) as s:
            s.rounds()


def test_missing_store_is_not_created_by_readers(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "results.sqlite", readonly=True)
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "results.sqlite")
    assert not (tmp_path / "results.sqlite").exists()


def test_readonly_never_changes_the_file_and_works_without_write_access(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    with Store(path, create=True) as s:
        s.put_round(_record())
        s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for name in ("results.sqlite-wal", "results.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # an archived, read-only folder: no write access anywhere (simulated: the tests may run as root)
    monkeypatch.setattr(store_mod, "can_write", lambda path: False)
    with Store(path, readonly=True) as s:
        assert len(s.rounds()) == 1
        with pytest.raises(StoreError, match="read-only"):
            s.set_meta("x", "y")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "results.sqlite-wal").exists()
