"""The project database: one SQLite file (WAL journal, synchronous FULL) inside the project folder.

Tables:

- ``meta``: the project's settings (classes, transform, model, training), JSON values.
- ``files``: one row per distinct file content: ``id`` (content hash), ``path`` (the first path seen), ``size``
  in bytes, ``row`` in the decoded-image cache (NULL when the file could not be decoded; ``error`` says why).
- ``paths``: every path seen, with its size and mtime and the content id, so re-indexing reads only new or
  changed files and a copied or moved file keeps its id.
- ``labels``: an append-only history: ``(seq, file_id, kind, label, who, at, round, source)``. ``kind`` is
  ``label`` (``label`` = class name), ``skip``, ``unsure`` or ``clear`` (undo back to nothing). The latest row
  of a file (highest ``seq``) is its state; nothing is ever updated or deleted, so two tabs labeling the same
  image lose nothing: both rows stay, the later one wins.
- ``rounds`` and ``queries``: each query (strategy, parameters, budget, checkpoint used, notes such as a
  strategy's fallback) and its picks with their scores and the model's top guesses.
- ``trainings``: each fit (sizes of the training and held-out sets, accuracy, checkpoint, per-epoch history).

Every write is one transaction, committed before the call returns (``synchronous=FULL``): a process killed at
any moment leaves every returned write on disk and no half-written round.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ActivelabError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, path TEXT NOT NULL, size INTEGER NOT NULL, row INTEGER UNIQUE, error TEXT,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS paths (path TEXT PRIMARY KEY, id TEXT, size INTEGER, mtime REAL);
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, file_id TEXT NOT NULL, kind TEXT NOT NULL, label TEXT,
    who TEXT, at REAL NOT NULL, round INTEGER, source TEXT
);
CREATE INDEX IF NOT EXISTS labels_by_file ON labels (file_id, seq);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, kind TEXT NOT NULL, strategy TEXT, params TEXT, budget INTEGER, created REAL,
    checkpoint TEXT, info TEXT
);
CREATE TABLE IF NOT EXISTS queries (
    round INTEGER NOT NULL, rank INTEGER NOT NULL, file_id TEXT NOT NULL, score REAL, guesses TEXT,
    PRIMARY KEY (round, rank)
);
CREATE TABLE IF NOT EXISTS trainings (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL, finished REAL, labels INTEGER, train_size INTEGER,
    val_size INTEGER, val_accuracy REAL, checkpoint TEXT, history TEXT
);
"""

KINDS = ("label", "skip", "unsure", "clear")

_LATEST = "SELECT l.* FROM labels l JOIN (SELECT file_id, MAX(seq) AS seq FROM labels GROUP BY file_id) m USING (seq)"


class Store:
    """Thread-safe access to one project database (one connection, a lock around every call)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=60000")
        with self.transaction() as c:
            for statement in SCHEMA.strip().split(";"):
                if statement.strip():
                    c.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- plumbing ------------------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: Store) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            self.store._conn.execute("BEGIN IMMEDIATE")
            return self.store._conn

        def __exit__(self, exc_type, *_) -> None:
            try:
                self.store._conn.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def transaction(self) -> Store._Tx:
        """``with store.transaction() as conn:`` one atomic write (BEGIN IMMEDIATE ... COMMIT)."""
        return Store._Tx(self)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # --- meta ----------------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_meta(self, **values: Any) -> None:
        with self.transaction() as c:
            for key, value in values.items():
                c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # --- files ---------------------------------------------------------------------------------------------
    def known_paths(self) -> dict[str, tuple[str | None, int, float]]:
        return {r["path"]: (r["id"], r["size"], r["mtime"]) for r in self.query("SELECT * FROM paths")}

    def file_ids(self) -> set[str]:
        return {r["id"] for r in self.query("SELECT id FROM files")}

    def add_files(
        self,
        files: Iterable[tuple[str, str, int, int | None, str | None]],
        paths: Iterable[tuple[str, str | None, int, float]],
    ) -> None:
        """Insert new files ``(id, path, size, row, error)`` and path records ``(path, id, size, mtime)``."""
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                "INSERT OR IGNORE INTO files (id, path, size, row, error, added) VALUES (?, ?, ?, ?, ?, ?)",
                [(*f, now) for f in files],
            )
            c.executemany("INSERT OR REPLACE INTO paths (path, id, size, mtime) VALUES (?, ?, ?, ?)", list(paths))

    def files(self, ok_only: bool = True) -> list[sqlite3.Row]:
        """Every file, by cache row (decodable ones only unless ``ok_only`` is false)."""
        where = "WHERE row IS NOT NULL" if ok_only else ""
        return self.query(f"SELECT * FROM files {where} ORDER BY row IS NULL, row, id")

    def file(self, file_id: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM files WHERE id = ?", (file_id,))
        return rows[0] if rows else None

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, str]:
        out = {}
        for p in paths:
            rows = self.query("SELECT id FROM paths WHERE path = ? AND id IS NOT NULL", (p,))
            if rows:
                out[p] = rows[0]["id"]
        return out

    # --- labels --------------------------------------------------------------------------------------------
    def add_labels(
        self,
        entries: Sequence[tuple[str, str, str | None]],
        who: str,
        source: str,
        round_: int | None = None,
    ) -> list[int]:
        """Append ``(file_id, kind, label)`` rows in one transaction; returns their sequence numbers."""
        for _file_id, kind, label in entries:
            if kind not in KINDS:
                raise ActivelabError(f"label kind must be one of {', '.join(KINDS)}; got {kind!r}")
            if (kind == "label") != (label is not None):
                raise ActivelabError(f"kind {kind!r} {'needs' if kind == 'label' else 'takes no'} class name")
        seqs = []
        now = time.time()
        with self.transaction() as c:
            for file_id, kind, label in entries:
                if c.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone() is None:
                    raise ActivelabError(f"no file with id {file_id!r} in this project")
                cur = c.execute(
                    "INSERT INTO labels (file_id, kind, label, who, at, round, source) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (file_id, kind, label, who, now, round_, source),
                )
                seqs.append(int(cur.lastrowid))
        return seqs

    def latest_labels(self, file_ids: Sequence[str] | None = None) -> dict[str, sqlite3.Row]:
        """The current state of every file that has one (or of ``file_ids``): file id -> its latest labels row."""
        if file_ids is None:
            return {r["file_id"]: r for r in self.query(_LATEST)}
        out = {}
        for fid in file_ids:
            rows = self.query("SELECT * FROM labels WHERE file_id = ? ORDER BY seq DESC LIMIT 1", (fid,))
            if rows:
                out[fid] = rows[0]
        return out

    def labeled_rows(self) -> list[sqlite3.Row]:
        """``(file_id, row, label)`` of every decodable file whose latest state is a label, by file id."""
        sql = (
            f"SELECT l.file_id, f.row, l.label FROM ({_LATEST}) l JOIN files f ON f.id = l.file_id "
            "WHERE l.kind = 'label' AND f.row IS NOT NULL ORDER BY l.file_id"
        )
        return self.query(sql)

    def state_counts(self) -> list[tuple[str, str | None, int]]:
        """``(kind, label, count)`` of the files' current states."""
        sql = f"SELECT kind, label, COUNT(*) AS n FROM ({_LATEST}) GROUP BY kind, label"
        return [(r["kind"], r["label"], int(r["n"])) for r in self.query(sql)]

    def paths_of(self, file_ids: Sequence[str]) -> dict[str, str]:
        out = {}
        for fid in file_ids:
            rows = self.query("SELECT path FROM files WHERE id = ?", (fid,))
            if rows:
                out[fid] = rows[0]["path"]
        return out

    def history(self, file_id: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM labels WHERE file_id = ? ORDER BY seq", (file_id,))

    def undo(self, file_id: str, seq: int, who: str, source: str) -> tuple[int | None, sqlite3.Row | None]:
        """Revert the labels row ``seq`` of ``file_id`` if it is still the latest: append a copy of the state
        before it (or ``clear``). Returns (new seq or None when someone else wrote since, the state now)."""
        with self.transaction() as c:
            rows = c.execute("SELECT * FROM labels WHERE file_id = ? ORDER BY seq DESC", (file_id,)).fetchall()
            if not rows or rows[0]["seq"] != seq:
                return None, rows[0] if rows else None
            # every row is a full state, so the row before ``seq`` is the state to go back to
            prev = rows[1] if len(rows) > 1 else None
            kind, label = (prev["kind"], prev["label"]) if prev is not None else ("clear", None)
            cur = c.execute(
                "INSERT INTO labels (file_id, kind, label, who, at, round, source) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (file_id, kind, label, who, time.time(), rows[0]["round"], f"{source}:undo"),
            )
            new = c.execute("SELECT * FROM labels WHERE seq = ?", (cur.lastrowid,)).fetchone()
            return int(cur.lastrowid), new

    # --- rounds --------------------------------------------------------------------------------------------
    def add_round(
        self,
        kind: str,
        strategy: str,
        params: dict,
        budget: int,
        checkpoint: str | None,
        info: dict,
        picks: Sequence[tuple[str, float | None, list]],
    ) -> int:
        """Record a query and its picks ``(file_id, score, guesses)`` in one transaction; returns its number."""
        with self.transaction() as c:
            row = c.execute("SELECT COALESCE(MAX(round), 0) + 1 FROM rounds").fetchone()
            number = int(row[0])
            c.execute(
                "INSERT INTO rounds (round, kind, strategy, params, budget, created, checkpoint, info) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (number, kind, strategy, json.dumps(params), budget, time.time(), checkpoint, json.dumps(info)),
            )
            c.executemany(
                "INSERT INTO queries (round, rank, file_id, score, guesses) VALUES (?, ?, ?, ?, ?)",
                [(number, i, fid, score, json.dumps(g)) for i, (fid, score, g) in enumerate(picks)],
            )
        return number

    def rounds(self) -> list[dict]:
        out = []
        for r in self.query("SELECT * FROM rounds ORDER BY round"):
            d = dict(r)
            d["params"], d["info"] = json.loads(d["params"] or "{}"), json.loads(d["info"] or "{}")
            out.append(d)
        return out

    def picks(self, round_: int) -> list[dict]:
        rows = self.query("SELECT * FROM queries WHERE round = ? ORDER BY rank", (round_,))
        return [{**dict(r), "guesses": json.loads(r["guesses"] or "[]")} for r in rows]

    def validation_ids(self) -> set[str]:
        """Files queried by a ``validation`` round (the "label k per class" mode)."""
        sql = "SELECT q.file_id FROM queries q JOIN rounds r USING (round) WHERE r.kind = 'validation'"
        return {r["file_id"] for r in self.query(sql)}

    # --- trainings -----------------------------------------------------------------------------------------
    def add_training(self, record: dict) -> int:
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO trainings (started, finished, labels, train_size, val_size, val_accuracy, checkpoint, "
                "history) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record["started"],
                    record["finished"],
                    record["labels"],
                    record["train_size"],
                    record["val_size"],
                    record["val_accuracy"],
                    record["checkpoint"],
                    json.dumps(record.get("history", [])),
                ),
            )
            return int(cur.lastrowid)

    def trainings(self) -> list[dict]:
        rows = self.query("SELECT * FROM trainings ORDER BY id")
        return [{**dict(r), "history": json.loads(r["history"] or "[]")} for r in rows]
