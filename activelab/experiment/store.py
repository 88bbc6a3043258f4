"""The results store: one SQLite file per experiment, one transaction per round.

Several worker processes write to the same file (WAL journal, busy timeout). A round is visible only once
its metrics, its selected indices and its test predictions are committed together, so a run killed at any
moment leaves either a whole round or none.

Each table is defined once, by a record dataclass whose fields carry their SQL column type and codec
(:func:`column`); the DDL, the insert and the reader all derive from it. Adding a per-round metric is one
nullable field on :class:`RoundRecord`: an existing store gains the column when it is next opened for writing,
and older rows read back as None.

The file records its schema version in ``meta``; a store without one is the first version (it is migrated in
place when opened for writing); a store from a newer activelab is refused with a message.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ActivelabError
from ..jsonable import jsonable

#: Set (to "1") in the processes that must reach the store only through the driver's store service (Ray tasks,
#: which may run on machines where SQLite would write over a network filesystem).
SERVICE_ONLY_ENV = "ACTIVELAB_STORE_SERVICE_ONLY"

SCHEMA_VERSION = 2
"""1: the first store (no version in meta). 2: version in meta, round metrics for imbalance, run data root,
job owner (pid, host), leases."""


class StoreError(ActivelabError):
    """The results store cannot be opened or read; the message names the file and what to do."""


# --- record definitions ------------------------------------------------------------------------------------


def column(sql: str, codec: str = "plain", default: Any = dataclasses.MISSING, **kw) -> Any:
    """A record field stored as one column: ``sql`` is its type (``NOT NULL`` for required), ``codec`` one of
    plain, json, json_intkeys (a dict with int keys), int64, int16 (numpy arrays as .npy blobs)."""
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata={"sql": sql, "codec": codec}, **kw)
    return field(default=default, metadata={"sql": sql, "codec": codec}, **kw)


def to_blob(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def from_blob(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def _encode(codec: str, value: Any) -> Any:
    if value is None:
        return None
    if codec == "json":
        return json.dumps(jsonable(value))
    if codec == "json_intkeys":
        return json.dumps({str(k): jsonable(v) for k, v in value.items()})
    if codec == "int64":
        return to_blob(np.asarray(value, dtype=np.int64))
    if codec == "int16":
        return to_blob(np.asarray(value, dtype=np.int16))
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(codec: str, value: Any) -> Any:
    if value is None:
        return None
    if codec == "json":
        return json.loads(value)
    if codec == "json_intkeys":
        return {int(k): v for k, v in json.loads(value).items()}
    if codec in ("int64", "int16"):
        return from_blob(value)
    return value


@dataclass(frozen=True)
class Column:
    name: str
    sql: str
    codec: str

    @property
    def required(self) -> bool:
        return "NOT NULL" in self.sql.upper()


@dataclass(frozen=True)
class Table:
    """A table derived from a record dataclass."""

    name: str
    record: type
    key: tuple[str, ...]

    @property
    def columns(self) -> list[Column]:
        return [Column(f.name, f.metadata["sql"], f.metadata["codec"]) for f in dataclasses.fields(self.record)]

    def ddl(self) -> str:
        cols = ", ".join(f"{c.name} {c.sql}" for c in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({cols}, PRIMARY KEY ({', '.join(self.key)}))"

    def insert_sql(self, verb: str = "INSERT") -> str:
        names = [c.name for c in self.columns]
        return f"{verb} INTO {self.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"

    def encode(self, rec: Any) -> tuple:
        return tuple(_encode(c.codec, getattr(rec, c.name)) for c in self.columns)

    def decode(self, row: dict[str, Any]) -> Any:
        """A record from a row; columns an older store lacks read as None."""
        return self.record(**{c.name: _decode(c.codec, row.get(c.name)) for c in self.columns})


@dataclass
class RoundRecord:
    run: int = column("INTEGER NOT NULL")
    strategy: str = column("TEXT NOT NULL")
    round: int = column("INTEGER NOT NULL")
    n_labeled: int = column("INTEGER NOT NULL")
    accuracy: float = column("REAL NOT NULL")
    balanced_accuracy: float = column("REAL NOT NULL")
    minority_recall: float | None = column("REAL")
    per_class_recall: list[float] = column("TEXT NOT NULL", "json")
    labeled_per_class: list[int] = column("TEXT NOT NULL", "json")
    select_seconds: float = column("REAL NOT NULL")
    train_seconds: float = column("REAL NOT NULL")
    eval_seconds: float = column("REAL NOT NULL")
    epochs: int = column("INTEGER NOT NULL")
    val_accuracy: float | None = column("REAL")
    selected: np.ndarray = column("BLOB NOT NULL", "int64")
    test_predictions: np.ndarray = column("BLOB NOT NULL", "int16")
    info: dict = column("TEXT NOT NULL", "json", default_factory=dict)
    # schema 2 --------------------------------------------------------------------------------------------
    selected_per_class: list[int] | None = column("TEXT", "json", default=None)
    """Per-class counts of the batch selected this round (from the pool's labels)."""
    macro_f1: float | None = column("REAL", default=None)
    worst_class_recall: float | None = column("REAL", default=None)
    classes_labeled: int | None = column("INTEGER", default=None)
    """Classes with at least one labeled sample after this round."""
    minority_label_share: float | None = column("REAL", default=None)
    """Fraction of the labeled set that belongs to the run's minority classes."""


@dataclass
class RunRecord:
    run: int = column("INTEGER NOT NULL")
    pool_size: int = column("INTEGER NOT NULL")
    class_counts: dict[int, int] = column("TEXT NOT NULL", "json_intkeys")
    minority: list[int] = column("TEXT NOT NULL", "json")
    pool_indices: np.ndarray = column("BLOB NOT NULL", "int64")
    validation_indices: np.ndarray = column("BLOB NOT NULL", "int64")
    data_root: str | None = column("TEXT", default=None)
    """The folder the dataset's files were read from."""


@dataclass
class JobRecord:
    run: int = column("INTEGER NOT NULL")
    strategy: str = column("TEXT NOT NULL")
    status: str = column("TEXT NOT NULL")  # running, done, failed
    error: str | None = column("TEXT")
    updated: float = column("REAL NOT NULL")
    pid: int | None = column("INTEGER", default=None)
    host: str | None = column("TEXT", default=None)


@dataclass
class LeaseRecord:
    name: str = column("TEXT NOT NULL")
    owner: str = column("TEXT NOT NULL")
    pid: int = column("INTEGER NOT NULL")
    host: str = column("TEXT NOT NULL")
    heartbeat: float = column("REAL NOT NULL")


@dataclass
class MetaRecord:
    key: str = column("TEXT NOT NULL")
    value: str = column("TEXT NOT NULL")


META = Table("meta", MetaRecord, ("key",))
RUNS = Table("runs", RunRecord, ("run",))
JOBS = Table("jobs", JobRecord, ("run", "strategy"))
ROUNDS = Table("rounds", RoundRecord, ("run", "strategy", "round"))
LEASES = Table("leases", LeaseRecord, ("name",))
TABLES = (META, RUNS, JOBS, ROUNDS, LEASES)


# --- the store ---------------------------------------------------------------------------------------------


def can_write(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _damaged(path: Path, what: str) -> StoreError:
    return StoreError(
        f"{path} {what}. It is not a results store activelab can read: restore it from a backup, or move the "
        f"experiment directory {path.parent} away (or delete it) and run the config again to recompute it."
    )


class Store:
    """An experiment's results store.

    ``readonly``: for reading commands (report, plot); works on a read-only or archived directory and never
    changes the file. ``create``: make the file if it does not exist (only a new experiment does).
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, create: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if os.environ.get(SERVICE_ONLY_ENV) == "1":
            raise StoreError(
                f"this process ({SERVICE_ONLY_ENV}=1: a Ray task, possibly on another machine) must not open "
                f"{self.path} itself; its store calls go to the driver's store service (open_store)"
            )
        self._check_file(create)
        try:
            self.conn = self._connect()
            self._columns = self._open_schema()
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise
            if "not a database" in str(exc):
                raise _damaged(self.path, "is not an SQLite file") from None
            if "readonly" in str(exc) or "read-only" in str(exc):
                raise StoreError(
                    f"{self.path} cannot be written ({exc}): `activelab run` needs write access to the experiment "
                    "directory; `report` and `plot` read it as it is"
                ) from None
            raise _damaged(self.path, f"could not be read ({exc})") from None

    def _check_file(self, create: bool) -> None:
        if not self.path.exists():
            if create and not self.readonly:
                return
            raise StoreError(f"{self.path} does not exist: this is not an experiment directory (run a config first)")
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a results store")
        if self.path.stat().st_size == 0:
            raise _damaged(self.path, "is empty (0 bytes; a disk that was full, or a copy that failed)")
        # The header is left to SQLite: opening and closing the file from Python would drop the POSIX locks
        # that this process's other connections to it hold (and lose their writes).

    def _connect(self) -> sqlite3.Connection:
        if not self.readonly:
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA journal_mode=WAL")
            return conn
        writable = can_write(self.path.parent) and can_write(self.path)
        wal = self.path.with_name(self.path.name + "-wal")
        # A read-only folder cannot hold the WAL index, so the file is opened as immutable there; an archived
        # copy has no writer, which is what immutable promises.
        immutable = not writable and not (wal.exists() and can_write(wal))
        uri = self.path.resolve().as_uri() + ("?immutable=1" if immutable else "?mode=ro")
        conn = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    def _table_columns(self) -> dict[str, set[str]]:
        names = [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: {r[1] for r in self.conn.execute(f"PRAGMA table_info({n})")} for n in names}

    def _open_schema(self) -> dict[str, set[str]]:
        existing = self._table_columns()
        version = self._stored_version(existing)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer activelab (store schema {version}; this one reads up to "
                f"{SCHEMA_VERSION}): upgrade activelab (pip install -U activelab) to read or resume it"
            )
        if self.readonly:
            if not existing:
                raise _damaged(self.path, "holds no tables")
            return existing
        if version < SCHEMA_VERSION or any(t.name not in existing for t in TABLES):
            with self.transaction() as c:
                self._migrate(c, self._table_columns())
            existing = self._table_columns()
        return existing

    def _stored_version(self, existing: dict[str, set[str]]) -> int:
        if "meta" not in existing:
            return 1 if existing else SCHEMA_VERSION  # empty file: a new store
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            return 1
        try:
            return int(row[0])
        except ValueError:
            raise StoreError(
                f"{self.path} has an unknown store schema version {row[0]!r}: it was not written by activelab"
            ) from None

    def _migrate(self, c: sqlite3.Connection, existing: dict[str, set[str]]) -> None:
        """Create missing tables and add the columns of fields newer than the file (all nullable)."""
        for table in TABLES:
            if table.name not in existing:
                c.execute(table.ddl())
                continue
            for col in table.columns:
                if col.name in existing[table.name]:
                    continue
                if col.required:
                    raise StoreError(
                        f"{self.path}: cannot migrate table {table.name}: required column {col.name} is missing. "
                        "Move the directory away and run the config again."
                    )
                c.execute(f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.sql}")
        c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    @property
    def schema_version(self) -> int:
        return self._stored_version(self._columns)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def _select(self, table: Table, where: str = "", args: tuple = (), order: str = "") -> list[Any]:
        sql = (
            f"SELECT * FROM {table.name}"
            + (f" WHERE {where}" if where else "")
            + (f" ORDER BY {order}" if order else "")
        )
        try:
            cursor = self.conn.execute(sql, args)
            names = [d[0] for d in cursor.description]
            return [table.decode(dict(zip(names, values))) for values in cursor]
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc)):
                raise
            raise _damaged(self.path, f"is damaged ({exc})") from None

    # -- meta ------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._select(META, "key = ?", (key,))
        return rows[0].value if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as c:
            c.execute(META.insert_sql("INSERT OR REPLACE"), META.encode(MetaRecord(key, value)))

    # -- runs ------------------------------------------------------------------------------------------
    def put_run(
        self,
        run: int,
        pool_indices,
        validation_indices,
        class_counts: dict,
        minority: list,
        data_root: str | None = None,
    ) -> None:
        rec = RunRecord(
            run=run,
            pool_size=len(pool_indices),
            class_counts={int(k): int(v) for k, v in class_counts.items()},
            minority=[int(m) for m in minority],
            pool_indices=np.asarray(pool_indices),
            validation_indices=np.asarray(validation_indices),
            data_root=data_root,
        )
        with self.transaction() as c:
            c.execute(RUNS.insert_sql("INSERT OR IGNORE"), RUNS.encode(rec))

    def run_record(self, run: int) -> RunRecord | None:
        rows = self._select(RUNS, "run = ?", (run,))
        return rows[0] if rows else None

    def run_info(self, run: int) -> dict | None:
        rec = self.run_record(run)
        return None if rec is None else {k: v for k, v in dataclasses.asdict(rec).items() if k != "run"}

    def runs(self) -> dict[int, dict]:
        return {
            r.run: {k: v for k, v in dataclasses.asdict(r).items() if k != "run"}
            for r in self._select(RUNS, order="run")
        }

    # -- jobs ------------------------------------------------------------------------------------------
    def set_job(
        self,
        run: int,
        strategy: str,
        status: str,
        error: str | None = None,
        pid: int | None = None,
        host: str | None = None,
    ) -> None:
        rec = JobRecord(run, strategy, status, error, time.time(), pid, host)
        with self.transaction() as c:
            c.execute(JOBS.insert_sql("INSERT OR REPLACE"), JOBS.encode(rec))

    def job_records(self) -> list[JobRecord]:
        return self._select(JOBS, order="run, strategy")

    def jobs(self) -> dict[tuple[int, str], tuple[str, str | None]]:
        return {(j.run, j.strategy): (j.status, j.error) for j in self.job_records()}

    # -- rounds ----------------------------------------------------------------------------------------
    def put_round(self, rec: RoundRecord) -> None:
        with self.transaction() as c:
            c.execute(ROUNDS.insert_sql(), ROUNDS.encode(rec))

    def rounds(self, run: int | None = None, strategy: str | None = None) -> list[RoundRecord]:
        where, args = ["1=1"], []
        if run is not None:
            where.append("run = ?")
            args.append(run)
        if strategy is not None:
            where.append("strategy = ?")
            args.append(strategy)
        return self._select(ROUNDS, " AND ".join(where), tuple(args), "strategy, run, round")

    def last_round(self, run: int, strategy: str) -> int | None:
        row = self.conn.execute(
            "SELECT MAX(round) FROM rounds WHERE run = ? AND strategy = ?", (run, strategy)
        ).fetchone()
        return row[0]

    def count_rounds(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]

    # -- leases ----------------------------------------------------------------------------------------
    def try_lease(self, name: str, owner: str, pid: int, host: str, is_stale) -> LeaseRecord | None:
        """Take lease ``name`` for ``owner`` unless a live holder has it; return the holder that keeps it (None
        when ``owner`` now holds it). ``is_stale(record)`` says whether a holder is gone."""
        with self.transaction() as c:
            cursor = c.execute("SELECT * FROM leases WHERE name = ?", (name,))
            row = cursor.fetchone()
            if row is not None:
                held = LEASES.decode(dict(zip([d[0] for d in cursor.description], row)))
                if held.owner != owner and not is_stale(held):
                    return held
            rec = LeaseRecord(name, owner, pid, host, time.time())
            c.execute(LEASES.insert_sql("INSERT OR REPLACE"), LEASES.encode(rec))
        return None

    def renew_lease(self, name: str, owner: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE leases SET heartbeat = ? WHERE name = ? AND owner = ?", (time.time(), name, owner))

    def release_lease(self, name: str, owner: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))
