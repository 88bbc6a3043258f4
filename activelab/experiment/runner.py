"""``activelab run``: set up an experiment directory (or resume it) and dispatch its jobs."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ExperimentConfig, load_config
from ..errors import ConfigError
from .executors import Executor, Job, LocalExecutor, default_threads
from .layout import CONFIG_NAME, STORE_NAME, Layout
from .store import Store


@dataclass
class RunOutcome:
    exp_dir: Path
    done: list[tuple[int, str]] = field(default_factory=list)
    failed: dict[tuple[int, str], str] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)


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


def _write_config(exp_dir: Path, config_text: str) -> None:
    tmp = exp_dir / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    tmp.write_text(config_text)
    os.replace(tmp, exp_dir / CONFIG_NAME)


def prepare_directory(cfg: ExperimentConfig, config_text: str, exp_dir: Path) -> None:
    """Create the directory with a copy of the config, or check that an existing one holds the same config.

    A config that differs from the stored one only in having more runs extends the experiment: it replaces
    the stored copy, and the new runs are run next to the finished ones (runs are seeded by their index)."""
    stored_path = exp_dir / CONFIG_NAME
    if stored_path.exists():
        stored = load_config(stored_path)
        if stored.fingerprint() != cfg.fingerprint():
            changes = _diff(stored.model_dump(mode="json"), cfg.model_dump(mode="json"))
            raise ConfigError(
                f"{exp_dir} holds an experiment with a different config; refusing to mix results.\n  "
                + "\n  ".join(changes[:20])
                + "\nUse another --out directory, or delete this one to start over."
            )
        if cfg.loop.runs > stored.loop.runs:
            _write_config(exp_dir, config_text)
        return
    exp_dir.mkdir(parents=True, exist_ok=True)
    _write_config(exp_dir, config_text)
    store = Store(Layout(exp_dir).store, create=True)
    store.set_meta("fingerprint", cfg.fingerprint())
    store.set_meta("experiment", cfg.name)
    store.close()


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


def run_experiment(
    config_path: str | Path,
    out: str | Path | None = None,
    workers: int = 1,
    runs: str | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> RunOutcome:
    config_path = Path(config_path)
    cfg = load_config(config_path)
    exp_dir = Path(out) if out is not None else Path("runs") / cfg.name
    prepare_directory(cfg, config_path.read_text(), exp_dir)
    cfg = load_config(exp_dir / CONFIG_NAME)
    threads = cfg.threads or default_threads(workers)
    executor = executor or LocalExecutor(workers)
    store = Store(Layout(exp_dir).store)
    outcome = RunOutcome(exp_dir)
    per_job = rounds_per_job(cfg)
    jobs = []
    for run in parse_runs(runs, cfg.loop.runs):
        for s in cfg.strategies:
            last = store.last_round(run, s.label)
            if last is not None and last >= cfg.loop.rounds:
                outcome.skipped.append((run, s.label))
            else:
                jobs.append(Job(str(exp_dir), run, s.label, threads))

    stop = threading.Event()
    bar_thread = None
    if progress and jobs:
        bar_thread = threading.Thread(target=_progress, args=(store.path, len(jobs) * per_job, stop), daemon=True)
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
        store.close()
    return outcome


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
    """The config and the store of an experiment directory, for reading (the store opened read-only, so an
    archived or read-only directory works)."""
    layout = Layout(exp_dir)
    if not layout.is_experiment():
        raise ConfigError(f"{layout.root} is not an experiment directory (no {CONFIG_NAME} / {STORE_NAME})")
    cfg = load_config(layout.config)
    return cfg, Store(layout.store, readonly=readonly)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
