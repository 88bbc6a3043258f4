"""The files of an experiment directory, in one place: every reader and writer asks this module for a path.

::

    <exp>/config.yaml                       the experiment's config (a copy of the YAML that started it)
    <exp>/results.sqlite                    the results store (rounds, runs, jobs, meta)
    <exp>/.lock                             held by the one `activelab run` writing to the directory
    <exp>/models/run<r>/init_<init>.pt      the initial weights of run r
    <exp>/models/run<r>/<label>/round<k>[_member<j>].pt   the model after round k (ensemble members j >= 1)
    <exp>/figures/                          what `activelab plot` draws (default)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CONFIG_NAME = "config.yaml"
STORE_NAME = "results.sqlite"
LOCK_NAME = ".lock"
TMP_SUFFIX = ".tmp"


def safe_name(label: str) -> str:
    """A strategy label as a folder name."""
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)


@dataclass(frozen=True)
class Layout:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def store(self) -> Path:
        return self.root / STORE_NAME

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def run_dir(self, run: int) -> Path:
        return self.models / f"run{run}"

    def initial_model(self, run: int, init: str) -> Path:
        return self.run_dir(run) / f"init_{init}.pt"

    def checkpoint(self, run: int, label: str, round_: int, member: int = 0) -> Path:
        """The saved model of a round; ensemble members beyond the first get their own files."""
        suffix = f"_member{member}" if member else ""
        return self.run_dir(run) / safe_name(label) / f"round{round_}{suffix}.pt"

    def is_experiment(self) -> bool:
        return self.config.is_file() and self.store.is_file()

    def temp_files(self) -> Iterator[Path]:
        """Temporary files a killed writer may have left (``.<name>.<pid>.tmp``)."""
        yield from self.root.glob(f".*{TMP_SUFFIX}")
        if self.models.is_dir():
            yield from self.models.rglob(f".*{TMP_SUFFIX}")


def temp_path(path: Path, pid: int) -> Path:
    """Where a writer puts ``path`` before renaming it into place."""
    return path.with_name(f".{path.name}.{pid}{TMP_SUFFIX}")
