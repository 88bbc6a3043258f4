"""The results store: one SQLite file per experiment, one transaction per round.

Several worker processes write to the same file (WAL journal, busy timeout). A round is visible only once
its metrics, its selected indices and its test predictions are committed together, so a run killed at any
moment leaves either a whole round or none.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA = """
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


def to_blob(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def from_blob(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


_JSON_COLUMNS = ("per_class_recall", "labeled_per_class", "info")
_ARRAY_COLUMNS = ("selected", "test_predictions")


@dataclass
class RoundRecord:
    run: int
    strategy: str
    round: int
    n_labeled: int
    accuracy: float
    balanced_accuracy: float
    minority_recall: float | None
    per_class_recall: list[float]
    labeled_per_class: list[int]
    select_seconds: float
    train_seconds: float
    eval_seconds: float
    epochs: int
    val_accuracy: float | None
    selected: np.ndarray
    test_predictions: np.ndarray
    info: dict = field(default_factory=dict)


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA busy_timeout=60000")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # -- meta ------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- runs ------------------------------------------------------------------------------------------
    def put_run(self, run: int, pool_indices, validation_indices, class_counts: dict, minority: list) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                (
                    run,
                    len(pool_indices),
                    json.dumps({str(k): int(v) for k, v in class_counts.items()}),
                    json.dumps([int(m) for m in minority]),
                    to_blob(pool_indices),
                    to_blob(validation_indices),
                ),
            )

    def run_info(self, run: int) -> dict | None:
        row = self.conn.execute(
            "SELECT pool_size, class_counts, minority, pool_indices, validation_indices FROM runs WHERE run = ?",
            (run,),
        ).fetchone()
        if row is None:
            return None
        return {
            "pool_size": row[0],
            "class_counts": {int(k): v for k, v in json.loads(row[1]).items()},
            "minority": json.loads(row[2]),
            "pool_indices": from_blob(row[3]),
            "validation_indices": from_blob(row[4]),
        }

    def runs(self) -> dict[int, dict]:
        return {r: self.run_info(r) for (r,) in self.conn.execute("SELECT run FROM runs ORDER BY run")}

    # -- jobs ------------------------------------------------------------------------------------------
    def set_job(self, run: int, strategy: str, status: str, error: str | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?)",
                (run, strategy, status, error, time.time()),
            )

    def jobs(self) -> dict[tuple[int, str], tuple[str, str | None]]:
        rows = self.conn.execute("SELECT run, strategy, status, error FROM jobs").fetchall()
        return {(r, s): (st, err) for r, s, st, err in rows}

    # -- rounds ----------------------------------------------------------------------------------------
    def put_round(self, rec: RoundRecord) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.run,
                    rec.strategy,
                    rec.round,
                    rec.n_labeled,
                    rec.accuracy,
                    rec.balanced_accuracy,
                    rec.minority_recall,
                    json.dumps(rec.per_class_recall),
                    json.dumps(rec.labeled_per_class),
                    rec.select_seconds,
                    rec.train_seconds,
                    rec.eval_seconds,
                    rec.epochs,
                    rec.val_accuracy,
                    json.dumps(rec.info),
                    to_blob(np.asarray(rec.selected, dtype=np.int64)),
                    to_blob(np.asarray(rec.test_predictions, dtype=np.int16)),
                ),
            )

    def rounds(self, run: int | None = None, strategy: str | None = None) -> list[RoundRecord]:
        query = "SELECT * FROM rounds WHERE 1=1"
        args: list = []
        if run is not None:
            query += " AND run = ?"
            args.append(run)
        if strategy is not None:
            query += " AND strategy = ?"
            args.append(strategy)
        query += " ORDER BY strategy, run, round"
        cursor = self.conn.execute(query, args)
        names = [column[0] for column in cursor.description]
        out = []
        for values in cursor:
            row = dict(zip(names, values))
            for key in _JSON_COLUMNS:
                row[key] = json.loads(row[key])
            for key in _ARRAY_COLUMNS:
                row[key] = from_blob(row[key])
            out.append(RoundRecord(**row))
        return out

    def last_round(self, run: int, strategy: str) -> int | None:
        row = self.conn.execute(
            "SELECT MAX(round) FROM rounds WHERE run = ? AND strategy = ?", (run, strategy)
        ).fetchone()
        return row[0]

    def count_rounds(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
