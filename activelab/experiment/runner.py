"""``activelab run``: set up an experiment directory (or resume it) and dispatch its jobs.

Before any job: the config is checked as far as it can be (strategies, device, run 0's data, the model on a
first batch), so a mistake leaves no directory behind. Then the directory is locked (one writer per experiment),
the config is compared with the one recorded in the store, temporary files left by a killed writer are removed
and the status of jobs a killed writer left behind is repaired.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ExperimentConfig, load_config, parse_config, parse_yaml
from ..errors import ActivelabWarning, ConfigError, ExperimentBusyError
from .executors import Executor, Job, LocalExecutor
from .layout import CONFIG_NAME, STORE_NAME, Layout, temp_path
from .store import Store

__all__ = ["CONFIG_NAME", "STORE_NAME", "RunOutcome", "load_experiment", "prepare_directory", "run_experiment"]

MAX_DEFAULT_THREADS = 4
NON_RESULT_KEYS = ("name", "description", "threads", "loop.keep_checkpoints")


@dataclass
class RunOutcome:
    exp_dir: Path
    done: list[tuple[int, str]] = field(default_factory=list)
    failed: dict[tuple[int, str], str] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def default_threads() -> int:
    """Intra-op threads per job when the config does not say: a constant of the machine, never of --workers,
    so that a job's numerics do not depend on how many jobs run beside it."""
    return max(1, min(MAX_DEFAULT_THREADS, os.cpu_count() or 1))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name}: {va!r} (stored) vs {vb!r} (given)")
    return out


def _dump(cfg: ExperimentConfig, without: tuple[str, ...] = ()) -> dict:
    data = cfg.model_dump(mode="json")
    for key in without:
        head, _, tail = key.partition(".")
        if tail:
            data.get(head, {}).pop(tail, None)
        else:
            data.pop(head, None)
    return data


def _write_config(layout: Layout, config_text: str, store: Store | None = None) -> None:
    tmp = temp_path(layout.config, os.getpid())
    tmp.write_text(config_text)
    os.replace(tmp, layout.config)
    if store is not None:
        store.set_meta("config", config_text)
        store.set_meta("fingerprint", load_config(layout.config).fingerprint())


# --- the recorded config ---------------------------------------------------------------------------------


def check_recorded_config(layout: Layout, store: Store, cfg: ExperimentConfig) -> str | None:
    """Check the directory's config.yaml against the copy recorded in the store when results were written.

    Raises :class:`ConfigError` when config.yaml was edited in a way that changes results; returns a warning
    (or None) for a store too old to hold the copy, whose fingerprint cannot be compared reliably."""
    recorded = store.get_meta("config")
    if recorded is None:
        fingerprint = store.get_meta("fingerprint")
        if fingerprint and fingerprint != cfg.fingerprint():
            return (
                f"{layout.config} cannot be checked against the results of {layout.root} (the store predates the "
                "recorded config copy and its fingerprint differs, perhaps only because of newer defaults): make "
                "sure the file was not edited after the results were recorded"
            )
        return None
    try:
        recorded_cfg = parse_config(parse_yaml(recorded, "the recorded config"), "the recorded config")
    except ConfigError as exc:
        return f"the config recorded in {layout.store} cannot be read by this version ({exc}); it was not checked"
    if recorded_cfg.fingerprint() != cfg.fingerprint():
        changes = _diff(_dump(recorded_cfg), _dump(cfg))
        raise ConfigError(
            f"{layout.config} was edited after results were recorded in {layout.root}; refusing to mix results.\n  "
            + "\n  ".join(
                c.replace("(stored)", "(recorded)").replace("(given)", "(in config.yaml)") for c in changes[:20]
            )
            + f'\nRestore the file (the recorded copy: sqlite3 {layout.store} "SELECT value FROM meta WHERE '
            "key = 'config'\"), or run the edited config into another --out directory."
        )
    return None


def _merge(stored: ExperimentConfig, cfg: ExperimentConfig, exp_dir: Path) -> tuple[bool, list[str]]:
    """Whether ``cfg`` grows the stored experiment (more runs, more strategies), and warnings. Raises when the
    two would mix results of different settings."""
    shared = ("strategies", "loop.runs", *NON_RESULT_KEYS)
    if stored.shared_fingerprint() != cfg.shared_fingerprint():
        changes = _diff(_dump(stored, shared), _dump(cfg, shared))
        raise ConfigError(
            f"{exp_dir} holds an experiment with a different config; refusing to mix results.\n  "
            + "\n  ".join(changes[:20])
            + "\nUse another --out directory, or delete this one to start over."
        )
    old = {s.label: s for s in stored.strategies}
    new = {s.label: s for s in cfg.strategies}
    changed = [label for label in old.keys() & new.keys() if old[label] != new[label]]
    if changed:
        raise ConfigError(
            f"{exp_dir} holds strategies {sorted(changed)} with other settings (init or key); refusing to mix "
            "results. Give the changed variant its own key, or use another --out directory."
        )
    added = [label for label in new if label not in old]
    missing = [label for label in old if label not in new]
    if added and missing:
        raise ConfigError(
            f"to add strategies {added} to {exp_dir}, keep its strategies in the config too: {missing} are missing"
        )
    if added and cfg.loop.runs < stored.loop.runs:
        raise ConfigError(
            f"to add strategies {added} to {exp_dir}, keep loop.runs at least {stored.loop.runs} (the config has "
            f"{cfg.loop.runs})"
        )
    grows = bool(added) or cfg.loop.runs > stored.loop.runs
    notes = []
    if not grows:
        kept = _diff(_dump(stored), _dump(cfg))
        kept = [k for k in kept if k.split(":")[0] in NON_RESULT_KEYS and k.split(":")[0] != "threads"]
        if kept:
            notes.append(
                f"{exp_dir} keeps its stored config; these settings of the given config are not used: "
                + "; ".join(kept)
            )
    return grows, notes


def prepare_directory(
    cfg: ExperimentConfig, config_text: str, exp_dir: str | Path | Layout, notes: list[str] | None = None
) -> ExperimentConfig:
    """Create the directory with a copy of the config, or check that an existing one holds a compatible config,
    and return the experiment's config (the stored one).

    A config that differs from the stored one only in having more runs or more strategies extends the
    experiment: it replaces the stored copy, and the new jobs are run next to the finished ones (jobs are seeded
    by run and strategy, so each is the same as in an experiment that had them from the start). The caller
    holds the directory's lock."""
    layout = exp_dir if isinstance(exp_dir, Layout) else Layout(exp_dir)
    notes = notes if notes is not None else []
    if layout.config.exists():
        if not layout.store.exists():
            raise ConfigError(
                f"{layout.root} has a {CONFIG_NAME} but no {STORE_NAME}: it is not a complete experiment directory; "
                "move it away or delete it and run again"
            )
        stored = load_config(layout.config)
        with Store(layout.store) as store:
            warning = check_recorded_config(layout, store, stored)
            if warning:
                notes.append(warning)
            grows, more = _merge(stored, cfg, layout.root)
            notes += more
            if grows:
                _write_config(layout, config_text, store)
            elif store.get_meta("config") is None and not warning:
                store.set_meta("config", layout.config.read_text())  # a first-version store: record the copy now
        return load_config(layout.config)
    layout.root.mkdir(parents=True, exist_ok=True)
    with Store(layout.store, create=True) as store:
        store.set_meta("experiment", cfg.name)
        _write_config(layout, config_text, store)
    return load_config(layout.config)


# --- one writer per experiment ---------------------------------------------------------------------------


@contextmanager
def experiment_lock(layout: Layout) -> Iterator[None]:
    """Hold the directory's lock (an exclusive ``flock`` on ``.lock``, released by the kernel when the process
    dies, so a killed run never leaves a stale lock). A second process gets :class:`ExperimentBusyError`."""
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        f = open(layout.lock, "a+")
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {layout.root} ({exc}): `activelab run` needs a writable experiment directory; "
            "`report` and `plot` read a read-only one as it is"
        ) from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            if "started" in holder:
                who += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}"
            raise ExperimentBusyError(
                f"{layout.root} is being run by another activelab process ({who}); one process writes to an "
                "experiment at a time: wait for it to finish (or stop it), then run again to resume"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


def writer_alive(layout: Layout) -> bool:
    """Whether a process holds the directory's lock now (it is writing to the experiment)."""
    if not layout.lock.exists():
        return False
    try:
        with open(layout.lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def repair(layout: Layout, store: Store, cfg: ExperimentConfig) -> None:
    """With the lock held: delete temporary files a killed writer left, mark complete jobs done and jobs whose
    process died "interrupted" (they are resumed)."""
    for path in list(layout.temp_files()):
        path.unlink(missing_ok=True)
    for job in store.job_records():
        last = store.last_round(job.run, job.strategy)
        if last is not None and last >= cfg.loop.rounds and job.status != "done":
            store.set_job(job.run, job.strategy, "done", None, job.pid, job.host)
        elif job.status == "running":
            error = f"interrupted: its process (pid {job.pid} on {job.host}) stopped before recording the job's end"
            store.set_job(job.run, job.strategy, "interrupted", error, job.pid, job.host)


def _threads(cfg: ExperimentConfig, store: Store, notes: list[str]) -> int:
    """The experiment's intra-op thread count: fixed when it is created (the config's ``threads``, else
    :func:`default_threads`) and used by every later run, whatever ``--workers`` or the config say."""
    stored = store.get_meta("threads")
    if stored is None:
        threads = cfg.threads or default_threads()
        store.set_meta("threads", str(threads))
        return threads
    threads = int(stored)
    if cfg.threads is not None and cfg.threads != threads:
        notes.append(
            f"threads: {cfg.threads} is not used: this experiment's jobs run with {threads} intra-op thread(s), "
            "fixed when it was created, so that results do not depend on it; use a new directory to change it"
        )
    return threads


def parse_runs(spec: str | None, total: int) -> range:
    """``A:B`` selects runs A..B-1 (0-based); ``A:`` and ``:B`` work as in Python; None means all."""
    if spec is None:
        return range(total)
    try:
        start_s, stop_s = spec.split(":")
        start = int(start_s) if start_s else 0
        stop = int(stop_s) if stop_s else total
    except ValueError:
        raise ConfigError(f"--runs takes A:B (0-based, B excluded), e.g. 0:3; got {spec!r}") from None
    if not 0 <= start < stop <= total:
        raise ConfigError(f"--runs {spec} is outside the config's {total} runs (0:{total})")
    return range(start, stop)


def rounds_per_job(cfg: ExperimentConfig) -> int:
    return cfg.loop.rounds + (1 if cfg.loop.initial > 0 else 0)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} cannot be read: {exc}") from None


def run_experiment(
    config_path: str | Path,
    out: str | Path | None = None,
    workers: int = 1,
    runs: str | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> RunOutcome:
    from .validate import preflight

    config_path = Path(config_path)
    cfg = load_config(config_path)
    config_text = _read_text(config_path)
    layout = Layout(out if out is not None else Path("runs") / cfg.name)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1; got {workers}")
    if layout.root.exists() and not layout.root.is_dir():
        raise ConfigError(f"--out {layout.root} is a file, not a directory")
    selected_runs = parse_runs(runs, cfg.loop.runs)
    preflight(cfg)  # before anything is written: a mistake leaves no directory behind
    outcome = RunOutcome(layout.root)
    with experiment_lock(layout):
        given = cfg
        cfg = prepare_directory(cfg, config_text, layout, outcome.warnings)
        with Store(layout.store) as store:
            threads = _threads(given, store, outcome.warnings)
            repair(layout, store, cfg)
            jobs = []
            for run in selected_runs:
                for s in cfg.strategies:
                    last = store.last_round(run, s.label)
                    if last is not None and last >= cfg.loop.rounds:
                        outcome.skipped.append((run, s.label))
                    else:
                        jobs.append(Job(str(layout.root), run, s.label, threads))
        for note in outcome.warnings:
            warnings.warn(note, ActivelabWarning, stacklevel=2)
        _dispatch(executor or LocalExecutor(workers), jobs, outcome, layout, rounds_per_job(cfg), progress)
    return outcome


def _dispatch(executor: Executor, jobs: list[Job], outcome: RunOutcome, layout: Layout, per_job: int, progress: bool):
    stop = threading.Event()
    bar_thread = None
    if progress and jobs:
        bar_thread = threading.Thread(target=_progress, args=(layout.store, len(jobs) * per_job, stop), daemon=True)
        bar_thread.start()

    def on_done(job: Job, error: str | None) -> None:
        key = (job.run, job.strategy)
        if error is None:
            outcome.done.append(key)
        else:
            outcome.failed[key] = error

    try:
        executor.run(jobs, on_done)
    finally:
        stop.set()
        if bar_thread is not None:
            bar_thread.join()


def _progress(store_path: Path, total: int, stop: threading.Event) -> None:
    from tqdm import tqdm

    store = Store(store_path, readonly=True)
    start = store.count_rounds()
    with tqdm(total=total, desc="rounds", unit="round", dynamic_ncols=True) as bar:
        while True:
            finished = stop.wait(1.0)
            bar.n = min(total, store.count_rounds() - start)
            bar.refresh()
            if finished:
                break
    store.close()


def load_experiment(exp_dir: str | Path, readonly: bool = True) -> tuple[ExperimentConfig, Store]:
    """The config and the store of an experiment directory, for reading: the store is opened read-only (an
    archived or read-only directory works) and config.yaml is checked against the recorded copy."""
    layout = Layout(exp_dir)
    if not layout.is_experiment():
        raise ConfigError(f"{layout.root} is not an experiment directory (no {CONFIG_NAME} / {STORE_NAME})")
    cfg = load_config(layout.config)
    store = Store(layout.store, readonly=readonly)
    try:
        warning = check_recorded_config(layout, store, cfg)
    except BaseException:
        store.close()
        raise
    if warning:
        warnings.warn(warning, ActivelabWarning, stacklevel=2)
    return cfg, store


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
