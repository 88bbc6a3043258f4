"""A labeling project: a folder holding the database, the decoded-image cache and the model checkpoints.

``Project`` is also the notebook object::

    from activelab.project import Project
    p = Project.init("shoes/", images="~/photos", classes=["sneaker", "boot", "sandal"])
    batch = p.query(20, strategy="margin")          # list of dicts: id, path, score, guesses
    p.teach([b["id"] for b in batch[:3]], ["boot", "boot", "sandal"])
    p.fit()                                          # train on the labeled set, validate on the held-out share
    p.status()                                       # labels per class, rounds, accuracy
    p.export("labels.csv")

Layout of the folder: ``project.db`` (see :mod:`activelab.project.store`), ``pixels.u8`` (every decodable file
once, as ``(C, size, size)`` uint8 records at ``row * C * size * size``; appended, never rewritten) and
``checkpoints/``.

Pool ids are file identities (the content hash), never positions: adding files between rounds keeps every id,
and a file copied or moved keeps its id and its labels.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ActivelabError
from .sources import (
    ImageTransform,
    content_id,
    decode_files,
    load_arrays,
    read_label_csv,
    resolve_csv_path,
    scan_folder,
    warn_corrupt,
)
from .store import Store

DB_NAME = "project.db"
PIXELS_NAME = "pixels.u8"
DEFAULT_MODEL = "lenet"
DEFAULT_TRAIN = {"optimizer": "adam", "lr": 0.001, "epochs": 15, "batch_size": 32, "select_by": "last"}
CHUNK = 512


class PoolImages(Dataset):
    """The project's decoded images (a memory map of ``pixels.u8``) at given cache rows, with labels.

    ``batch(positions)`` gives normalised float batches, like :class:`~activelab.data.arrays.ArrayDataset`,
    so training and inference slice whole batches; nothing is loaded until asked for.
    """

    def __init__(self, pixels: np.ndarray, rows: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
        self.pixels, self.rows = pixels, np.asarray(rows, dtype=np.int64)
        self.y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.classes = list(classes)
        c = pixels.shape[1]
        self.mean = torch.full((c,), 0.5)
        self.std = torch.full((c,), 0.25)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def targets(self) -> np.ndarray:
        return self.y.numpy()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.pixels.shape[-1])

    def batch(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.rows[positions]
        order = np.argsort(rows, kind="stable")  # read the memory map forwards
        x = np.empty((len(rows), *self.pixels.shape[1:]), dtype=np.uint8)
        x[order] = self.pixels[rows[order]]
        xt = torch.from_numpy(x).float() / 255.0
        xt = (xt - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return xt, self.y[torch.as_tensor(positions)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(np.asarray([i]))
        return x[0], int(y[0])


class Project:
    """An open project folder; see the module docstring. Safe to use from several threads."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser().resolve()
        db = self.folder / DB_NAME
        if not db.is_file():
            raise ActivelabError(f"{self.folder} is not an activelab project (no {DB_NAME}); create it with init")
        self.store = Store(db)
        self.classes: list[str] = self.store.get_meta("classes", [])
        self.transform = ImageTransform(**self.store.get_meta("transform", {}))
        self._pixels_lock = threading.Lock()
        self._fit_lock = threading.Lock()
        self._pixels_map: np.ndarray | None = None

    # --- creation and indexing -----------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        folder: str | os.PathLike,
        *,
        images: str | os.PathLike | None = None,
        labels: str | os.PathLike | None = None,
        arrays: str | os.PathLike | None = None,
        classes: Sequence[str] | None = None,
        size: int = 64,
        mode: str = "RGB",
        fit: str = "pad",
        model: str = DEFAULT_MODEL,
        train: dict | None = None,
        validation_share: float = 0.2,
        seed: int = 0,
    ) -> Project:
        """Create the project folder and index the data.

        Args:
            images: a folder of images: flat (unlabeled), or one sub-folder per class (its name is the label).
            labels: a CSV of ``path,label`` (class names; empty = unlabeled). Relative paths are relative to the
                CSV's folder, or to ``images`` when given; files it lists are indexed too.
            arrays: an ``.npy`` (images) or ``.npz`` (``x``, optional ``y`` and ``classes``) file.
            classes: the class names, in key order. Default: the class folders, the CSV's labels, or the arrays'.
            size, mode, fit: the declared transform (see :class:`~activelab.project.sources.ImageTransform`).
            model: a built-in model name (``activelab.models.available_models()``) or ``"module:factory"``, a
                callable taking the number of classes and returning an ``nn.Module``.
            train: overrides of the training settings (``activelab.config.TrainConfig`` fields).
            validation_share: the share of labeled images held out to measure accuracy (chosen by content
                hash, so an image never moves between the two sides).
        """
        folder = Path(folder).expanduser().resolve()
        if (folder / DB_NAME).exists():
            raise ActivelabError(f"{folder} already holds a project; open it with Project({str(folder)!r})")
        if images is None and labels is None and arrays is None:
            raise ActivelabError("give the data: images=FOLDER, labels=CSV and/or arrays=FILE")
        if not 0.0 <= validation_share < 1.0:
            raise ActivelabError(f"validation_share must lie in [0, 1); got {validation_share}")
        transform = ImageTransform(size=size, mode=mode, fit=fit)  # validates
        _check_model_name(model)
        train_cfg = _train_config({**DEFAULT_TRAIN, **(train or {})})
        sources: list[dict] = []
        if images is not None:
            root = Path(images).expanduser().resolve()
            if not root.is_dir():
                raise ActivelabError(f"--images {root} is not a folder")
            sources.append({"kind": "folder", "path": str(root)})
        if labels is not None:
            csv_path = Path(labels).expanduser().resolve()
            base = str(Path(images).expanduser().resolve()) if images is not None else None
            sources.append({"kind": "csv", "path": str(csv_path), "base": base})
        if arrays is not None:
            sources.append({"kind": "arrays", "path": str(Path(arrays).expanduser().resolve())})
        names = list(classes) if classes else _discover_classes(sources)
        if not names:
            raise ActivelabError("no class names: pass classes=[...] (--classes a,b,c) or give labeled data")
        if len(set(names)) != len(names):
            raise ActivelabError(f"class names must be distinct; got {names}")
        if len(names) < 2:
            raise ActivelabError(f"a classifier needs at least 2 classes; got {names}")
        for s in sources:  # an unknown class is an error before anything is written
            if s["kind"] == "csv":
                read_label_csv(s["path"], names)
            elif s["kind"] == "folder":
                unknown = sorted(set(_discover_classes([s])) - set(names))
                if unknown:
                    raise ActivelabError(
                        f"{s['path']} has sub-folders {unknown} that are not classes ({', '.join(names)}); a "
                        "sub-folder names the class of its images: rename them or add the classes"
                    )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "checkpoints").mkdir(exist_ok=True)
        store = Store(folder / DB_NAME)
        store.set_meta(
            classes=names,
            transform=asdict(transform),
            model=model,
            train=train_cfg.model_dump(),
            validation_share=validation_share,
            seed=seed,
            sources=sources,
            created=time.time(),
        )
        store.close()
        project = cls(folder)
        project.index()
        return project

    @property
    def pixels_path(self) -> Path:
        return self.folder / PIXELS_NAME

    def pixels(self) -> np.ndarray:
        """The decoded-image cache as a read-only ``(rows, C, size, size)`` memory map."""
        n = self.pixels_path.stat().st_size // self.transform.nbytes if self.pixels_path.exists() else 0
        shape = (n, self.transform.channels, self.transform.size, self.transform.size)
        if n == 0:
            return np.zeros(shape, np.uint8)
        cached = self._pixels_map
        if cached is None or cached.shape[0] != n:  # the cache only grows: re-map when it did
            cached = self._pixels_map = np.memmap(self.pixels_path, dtype=np.uint8, mode="r", shape=shape)
        return cached

    def index(self, workers: int | None = None) -> dict:
        """Read new or changed files of every source (each file read and decoded once) and their labels.

        Returns counts: ``new`` files, ``known`` (unchanged, not read), ``duplicates`` (same content as an indexed
        file), ``corrupt`` (skipped, with a warning listing them) and ``labels`` taken from class folders or the
        CSV (only for files without a label yet).
        """
        counts = {"new": 0, "known": 0, "duplicates": 0, "corrupt": 0, "labels": 0}
        with self._index_lock():
            items: list[tuple[str, str | None]] = []  # (absolute path, class name or None)
            array_sources = []
            for s in self.store.get_meta("sources", []):
                if s["kind"] == "folder":
                    root = Path(s["path"])
                    known_classes = set(self.classes)  # a folder added later that is no class: unlabeled
                    items += [(str(root / p), c if c in known_classes else None) for p, c in scan_folder(root)]
                elif s["kind"] == "csv":
                    rows, _ = read_label_csv(s["path"], self.classes)
                    base = s.get("base")
                    for p, c in rows:
                        full = Path(base) / p if base and not Path(p).is_absolute() else resolve_csv_path(s["path"], p)
                        items.append((str(full), c))
                else:
                    array_sources.append(s["path"])
            inside = str(self.folder) + os.sep  # the project folder inside the images folder: never indexed
            items = [(p, c) for p, c in items if not p.startswith(inside)]
            bad = self._index_files(items, counts, workers)
            for path in array_sources:
                self._index_arrays(path, counts)
            warn_corrupt(bad, str(self.folder))
        return counts

    @contextlib.contextmanager
    def _index_lock(self):
        with open(self.folder / "index.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _append_pixels(self, images: list[np.ndarray]) -> int:
        """Append decoded images to the cache; returns the row of the first. A torn tail is cut first."""
        nbytes = self.transform.nbytes
        with self._pixels_lock, open(self.pixels_path, "ab") as f:
            size = f.tell()
            if size % nbytes:
                f.truncate(size - size % nbytes)  # a write cut short by a kill: no database row points there
                size -= size % nbytes
            f.write(b"".join(img.tobytes() for img in images))
            f.flush()
            os.fsync(f.fileno())
        return size // nbytes

    def _index_files(self, items: list[tuple[str, str | None]], counts: dict, workers: int | None) -> list:
        known = self.store.known_paths()
        have = self.store.file_ids()
        labeled = set(self.store.latest_labels())
        todo: list[tuple[Path, str | None, int, float]] = []
        label_of: dict[str, str | None] = {}
        pending_labels: list[tuple[str, str, str | None]] = []
        for path, label in dict(items).items():
            try:
                st = os.stat(path)
            except OSError:
                continue
            label_of[path] = label
            old = known.get(path)
            if old is not None and old[1] == st.st_size and old[2] == st.st_mtime:
                counts["known"] += 1
                if old[0] is not None and label is not None and old[0] not in labeled:
                    pending_labels.append((old[0], "label", label))
                    labeled.add(old[0])
                continue
            todo.append((Path(path), label, st.st_size, st.st_mtime))
        bad: list[tuple[str, str]] = []
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            new_files, new_paths, images = [], [], []
            results = decode_files([p for p, *_ in chunk], self.transform, workers)
            for (path, label, _size, mtime), (_, cid, nbytes, image, error) in zip(chunk, results):
                if cid is None:  # vanished or unreadable
                    bad.append((str(path), error or "unreadable"))
                    continue
                new_paths.append((str(path), cid, nbytes, mtime))
                if cid in have:
                    counts["duplicates"] += 1
                elif image is None:
                    bad.append((str(path), error or "undecodable"))
                    new_files.append([cid, str(path), nbytes, None, error])
                    have.add(cid)
                    counts["corrupt"] += 1
                else:
                    new_files.append([cid, str(path), nbytes, len(images), None])
                    images.append(image)
                    have.add(cid)
                    counts["new"] += 1
                if image is not None and label is not None and cid not in labeled:
                    pending_labels.append((cid, "label", label))
                    labeled.add(cid)
            if images:
                first = self._append_pixels(images)
                for f in new_files:
                    if f[3] is not None:
                        f[3] += first
            self.store.add_files([tuple(f) for f in new_files], new_paths)
        if pending_labels:
            self.store.add_labels(pending_labels, who="source", source="index")
            counts["labels"] += len(pending_labels)
        return bad

    def _index_arrays(self, path: str, counts: dict) -> None:
        data = load_arrays(path, self.classes)
        if data.x.shape[1:] != (self.transform.channels, self.transform.size, self.transform.size):
            x = torch.nn.functional.interpolate(data.x.float(), size=(self.transform.size,) * 2, mode="bilinear")
            if x.shape[1] != self.transform.channels:
                x = x.mean(1, keepdim=True) if self.transform.channels == 1 else x.expand(-1, 3, -1, -1)
            x = x.round().clamp(0, 255).to(torch.uint8)
        else:
            x = data.x
        known = self.store.known_paths()
        have = self.store.file_ids()
        labeled = set(self.store.latest_labels())
        arr = x.numpy()
        new_files, new_paths, images, labels = [], [], [], []
        for i in range(len(arr)):
            key = f"{path}#{i}"
            if key in known:
                counts["known"] += 1
                continue
            cid = content_id(np.ascontiguousarray(data.x[i].numpy()).tobytes())
            new_paths.append((key, cid, int(arr[i].nbytes), 0.0))
            if cid in have:
                counts["duplicates"] += 1
                continue
            new_files.append([cid, key, int(arr[i].nbytes), len(images), None])
            images.append(arr[i])
            have.add(cid)
            counts["new"] += 1
            if int(data.y[i]) >= 0 and cid not in labeled:
                labels.append((cid, "label", data.classes[int(data.y[i])]))
        if images:
            first = self._append_pixels(images)
            for f in new_files:
                f[3] += first
        self.store.add_files([tuple(f) for f in new_files], new_paths)
        if labels:
            self.store.add_labels(labels, who="source", source="index")
            counts["labels"] += len(labels)

    def add_source(self, images: str | os.PathLike | None = None, labels: str | os.PathLike | None = None) -> dict:
        """Add a folder of images or a label CSV to the project, then index."""
        sources = self.store.get_meta("sources", [])
        if images is not None:
            sources.append({"kind": "folder", "path": str(Path(images).expanduser().resolve())})
        if labels is not None:
            read_label_csv(labels, self.classes)
            sources.append({"kind": "csv", "path": str(Path(labels).expanduser().resolve()), "base": None})
        self.store.set_meta(sources=sources)
        return self.index()

    # --- labels --------------------------------------------------------------------------------------------
    def resolve(self, files_or_ids: Sequence[str | os.PathLike]) -> list[str]:
        """Content ids of the given ids or file paths (an unknown one is an error naming it)."""
        have = self.store.file_ids()
        out = []
        for item in files_or_ids:
            s = str(item)
            if s in have:
                out.append(s)
                continue
            p = str(Path(s).expanduser().resolve())
            found = self.store.ids_for_paths([p])
            if p in found:
                out.append(found[p])
                continue
            if Path(p).is_file():
                cid = content_id(Path(p).read_bytes())
                if cid in have:
                    out.append(cid)
                    continue
            raise ActivelabError(f"{s!r} is neither a file id nor an indexed file of this project")
        return out

    def teach(
        self,
        files_or_ids: Sequence[str | os.PathLike],
        labels: Sequence[str | int | None],
        who: str = "notebook",
        source: str = "notebook",
    ) -> list[int]:
        """Label files (by id or path) with class names or indices (None = skip); one atomic write."""
        ids = self.resolve(files_or_ids)
        if len(ids) != len(labels):
            raise ActivelabError(f"{len(ids)} files but {len(labels)} labels")
        entries = [(fid, *self._kind_label(label)) for fid, label in zip(ids, labels)]
        return self.store.add_labels(entries, who=who, source=source, round_=self.current_round())

    def _kind_label(self, label: str | int | None) -> tuple[str, str | None]:
        if label is None:
            return "skip", None
        if isinstance(label, (int, np.integer)):
            if not 0 <= int(label) < len(self.classes):
                raise ActivelabError(f"class index {label} is outside 0..{len(self.classes) - 1}")
            return "label", self.classes[int(label)]
        if label in ("skip", "unsure", "clear"):
            return str(label), None
        if label not in self.classes:
            raise ActivelabError(f"unknown class {label!r}; the classes are {', '.join(self.classes)}")
        return "label", str(label)

    def labels(self) -> dict[str, str]:
        """file id -> class name, for every file whose latest state is a label."""
        return {fid: r["label"] for fid, r in self.store.latest_labels().items() if r["kind"] == "label"}

    def current_round(self) -> int | None:
        rows = self.store.query("SELECT MAX(round) AS r FROM rounds")
        return rows[0]["r"] if rows and rows[0]["r"] is not None else None

    # --- the split between training and the held-out share -------------------------------------------------
    def is_validation(self, file_id: str, explicit: set[str] | None = None) -> bool:
        """Held out for validation: queried by a "label k per class" round, or in the hash-chosen share."""
        if explicit is not None and file_id in explicit:
            return True
        share = float(self.store.get_meta("validation_share", 0.2))
        return int(file_id[:8], 16) % 10_000 < share * 10_000

    def labeled_split(self) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
        """``(train, validation)`` lists of ``(file id, cache row, class index)`` of the labeled files."""
        index = {c: i for i, c in enumerate(self.classes)}
        explicit = self.store.validation_ids()
        train, val = [], []
        for r in self.store.labeled_rows():
            if r["label"] in index:
                entry = (r["file_id"], int(r["row"]), index[r["label"]])
                (val if self.is_validation(r["file_id"], explicit) else train).append(entry)
        return train, val

    # --- model ---------------------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        from .training import build_project_model

        return build_project_model(self.store.get_meta("model", DEFAULT_MODEL), len(self.classes), self.transform)

    def latest_checkpoint(self) -> str | None:
        rows = self.store.query("SELECT checkpoint FROM trainings WHERE checkpoint IS NOT NULL ORDER BY id DESC")
        for r in rows:
            if (self.folder / r["checkpoint"]).is_file():
                return r["checkpoint"]
        return None

    def load_model(self, checkpoint: str | None = None) -> torch.nn.Module | None:
        checkpoint = checkpoint or self.latest_checkpoint()
        if checkpoint is None:
            return None
        model = self.build_model()
        state = torch.load(self.folder / checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["state_dict"])
        return model

    def fit(self, progress: Callable[[dict], None] | None = None, **train_overrides: Any) -> dict:
        """Train a fresh model on the labeled training share; measure it on the held-out share.

        ``progress`` is called after every epoch with ``{"epoch", "epochs", "loss", "train_accuracy"}``.
        Returns the training record (also stored): sizes, accuracy on the held-out share (None if it is empty),
        checkpoint. Labeling may go on meanwhile: the labeled set is read once, at the start.
        """
        from .training import fit_project_model

        with self._fit_lock:
            return fit_project_model(self, progress=progress, **train_overrides)

    # --- queries -------------------------------------------------------------------------------------------
    def query(
        self,
        n: int,
        strategy: str = "margin",
        *,
        seed: int | None = None,
        validation_per_class: int | None = None,
        device: str = "cpu",
        **params: Any,
    ) -> list[dict]:
        """Pick ``n`` images to label next (or, with ``validation_per_class=k``, ``k`` per class for the
        held-out set); record the round; return the picks as dicts (id, path, score, guesses, rank)."""
        from .querying import run_query

        self.index()
        round_ = run_query(
            self, n, strategy, seed=seed, validation_per_class=validation_per_class, device=device, **params
        )
        return self.batch(round_)

    def batch(self, round_: int | None = None) -> list[dict]:
        """The picks of a round (default: the latest) with their current label state."""
        round_ = round_ if round_ is not None else self.current_round()
        if round_ is None:
            return []
        picks = self.store.picks(round_)
        latest = self.store.latest_labels([p["file_id"] for p in picks])
        files = self.store.paths_of([p["file_id"] for p in picks])
        out = []
        for pick in picks:
            state = latest.get(pick["file_id"])
            out.append(
                {
                    "id": pick["file_id"],
                    "path": files[pick["file_id"]],
                    "rank": pick["rank"],
                    "score": pick["score"],
                    "guesses": pick["guesses"],
                    "kind": state["kind"] if state is not None else None,
                    "label": state["label"] if state is not None else None,
                    "seq": state["seq"] if state is not None else None,
                }
            )
        return out

    # --- reports -------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """Files, labels per class, skipped/unsure counts, rounds, held-out size and the last accuracy."""
        per_class = {c: 0 for c in self.classes}
        other = {"skip": 0, "unsure": 0}
        for kind, label, n in self.store.state_counts():
            if kind == "label" and label in per_class:
                per_class[label] += n
            elif kind in other:
                other[kind] += n
        train, val = self.labeled_split()
        files = self.store.query("SELECT COUNT(*) AS n, SUM(row IS NULL) AS bad FROM files")[0]
        trainings = self.store.trainings()
        rounds = self.store.rounds()
        last = trainings[-1] if trainings else None
        explicit = len(self.store.validation_ids())
        return {
            "folder": str(self.folder),
            "files": int(files["n"] or 0) - int(files["bad"] or 0),
            "corrupt": int(files["bad"] or 0),
            "classes": list(self.classes),
            "labeled": sum(per_class.values()),
            "per_class": per_class,
            "skipped": other["skip"],
            "unsure": other["unsure"],
            "train_size": len(train),
            "validation_size": len(val),
            "validation_note": (
                f"held out to measure accuracy: {explicit} image(s) queried by 'label k per class' rounds, "
                f"plus a fixed {float(self.store.get_meta('validation_share', 0.2)):.0%} share of the labels "
                "(chosen by content hash); never trained on"
            ),
            "rounds": len(rounds),
            "last_round": rounds[-1] if rounds else None,
            "last_accuracy": last["val_accuracy"] if last else None,
            "last_training": {k: last[k] for k in ("labels", "train_size", "val_size", "val_accuracy")}
            if last
            else None,
            "curve": [
                {
                    "labels": t["labels"],
                    "train_size": t["train_size"],
                    "val_size": t["val_size"],
                    "accuracy": t["val_accuracy"],
                }
                for t in trainings
            ],
        }

    def report(self) -> str:
        """``status`` as text (the ``activelab project status`` output)."""
        s = self.status()
        lines = [
            f"project {s['folder']}: {s['files']:,} images ({s['corrupt']} unreadable), {len(s['classes'])} classes",
            f"labeled {s['labeled']:,} (skipped {s['skipped']}, unsure {s['unsure']}); rounds {s['rounds']}",
            f"training set {s['train_size']}, held-out set {s['validation_size']} ({s['validation_note']})",
        ]
        width = max(len(c) for c in s["classes"])
        lines += [f"  {c:<{width}}  {n:>6}" for c, n in s["per_class"].items()]
        if s["last_training"]:
            acc = s["last_accuracy"]
            lines.append(
                f"last model: accuracy {'n/a' if acc is None else f'{acc:.1%}'} on {s['last_training']['val_size']} "
                f"held-out images, trained on {s['last_training']['train_size']}"
            )
        last = s["last_round"]
        if last and last["info"].get("fallback"):
            reason = last["info"].get("fallback_reason", "")
            lines.append(f"note: round {last['round']} fell back to {last['info']['fallback']} picks: {reason}")
        return "\n".join(lines)

    # --- export / import -----------------------------------------------------------------------------------
    def export(self, out: str | os.PathLike, format: str | None = None, link: bool = False) -> Path:
        """Write the labels: ``csv`` (path,label), ``json`` (id, path, label, who, at, round, history) or
        ``imagefolder`` (a torchvision ImageFolder tree ``out/<class>/<file>``, files copied, or hard-linked
        with ``link``). The format defaults from the suffix of ``out`` (a folder means imagefolder)."""
        out = Path(out).expanduser()
        fmt = (format or {".csv": "csv", ".json": "json"}.get(out.suffix.lower(), "imagefolder")).lower()
        files = {r["id"]: r for r in self.store.query("SELECT * FROM files")}
        labels = sorted(self.labels().items(), key=lambda kv: files[kv[0]]["path"])
        if fmt == "csv":
            tmp = out.with_name(out.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "label"])
                for fid, label in labels:
                    w.writerow([files[fid]["path"], label])
            os.replace(tmp, out)
        elif fmt == "json":
            latest = self.store.latest_labels()
            records = []
            for fid, label in labels:
                r = latest[fid]
                history = [
                    {k: h[k] for k in ("kind", "label", "who", "at", "round", "source")}
                    for h in self.store.history(fid)
                ]
                records.append(
                    {
                        "id": fid,
                        "path": files[fid]["path"],
                        "label": label,
                        "who": r["who"],
                        "at": r["at"],
                        "round": r["round"],
                        "history": history,
                    }
                )
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps({"classes": self.classes, "labels": records}, indent=1))
            os.replace(tmp, out)
        elif fmt == "imagefolder":
            out.mkdir(parents=True, exist_ok=True)
            for c in self.classes:
                (out / c).mkdir(exist_ok=True)
            for fid, label in labels:
                src = Path(files[fid]["path"])
                if "#" in src.name or not src.is_file():  # an array row, or a file gone: write the cached image
                    from .sources import array_to_image_bytes

                    row = files[fid]["row"]
                    (out / label / f"{fid}.png").write_bytes(array_to_image_bytes(np.asarray(self.pixels()[row])))
                    continue
                dest = out / label / f"{fid[:12]}_{src.name}"
                if dest.exists():
                    continue
                if link:
                    try:
                        os.link(src, dest)
                        continue
                    except OSError:
                        pass
                shutil.copy2(src, dest)
        else:
            raise ActivelabError(f"unknown export format {fmt!r}; choose csv, json or imagefolder")
        return out

    def import_labels(self, path: str | os.PathLike, who: str = "import", overwrite: bool = False) -> dict:
        """Merge labels from a CSV (path,label), a JSON export or an ImageFolder tree.

        A file with no label yet gets the imported one; one with the same label is left alone; one with a
        different label is a *conflict*: reported (``conflicts``: id, path, ours, theirs) and not written,
        unless ``overwrite``. Files not in the project are reported as ``unknown``.
        """
        path = Path(path).expanduser()
        pairs: list[tuple[str, str]] = []  # (path or id, class name)
        if path.is_dir():
            for rel, label in scan_folder(path):
                if label is not None:
                    pairs.append((str(path / rel), label))
            unknown_classes = sorted({c for _, c in pairs} - set(self.classes))
            if unknown_classes:
                raise ActivelabError(f"{path} has class folders that are not project classes: {unknown_classes}")
        elif path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            for rec in data.get("labels", []):
                pairs.append((rec.get("id") or rec["path"], rec["label"]))
            unknown_classes = sorted({c for _, c in pairs} - set(self.classes))
            if unknown_classes:
                raise ActivelabError(f"{path}: unknown class(es) {unknown_classes}; the classes are {self.classes}")
        else:
            rows, _ = read_label_csv(path, self.classes)
            pairs = [(str(resolve_csv_path(path, p)), c) for p, c in rows if c is not None]
        current = self.labels()
        have = self.store.file_ids()
        files = {r["id"]: r["path"] for r in self.store.query("SELECT id, path FROM files")}
        entries, conflicts, unknown, same = [], [], [], 0
        for key, label in pairs:
            try:
                fid = key if key in have else self.resolve([key])[0]
            except ActivelabError:
                unknown.append(key)
                continue
            ours = current.get(fid)
            if ours == label:
                same += 1
            elif ours is None or overwrite:
                entries.append((fid, "label", label))
                current[fid] = label
            else:
                conflicts.append({"id": fid, "path": files[fid], "ours": ours, "theirs": label})
        if entries:
            self.store.add_labels(entries, who=who, source=f"import:{path.name}")
        return {"added": len(entries), "unchanged": same, "conflicts": conflicts, "unknown": unknown}

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.folder)!r})"


def open_project(folder: str | os.PathLike) -> Project:
    """Open an existing project folder (the notebook entry point)."""
    return Project(folder)


def _discover_classes(sources: list[dict]) -> list[str]:
    names: set[str] = set()
    for s in sources:
        if s["kind"] == "folder":
            root = Path(s["path"])
            names |= {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")}
        elif s["kind"] == "csv":
            names |= set(read_label_csv(s["path"])[1])
        else:
            names |= set(load_arrays(s["path"]).classes) if _has_labels(s["path"]) else set()
    return sorted(names)


def _has_labels(path: str) -> bool:
    if not path.endswith(".npz"):
        return False
    with np.load(path, allow_pickle=False) as z:
        return "y" in z or "classes" in z


def _check_model_name(model: str) -> None:
    from pydantic import ValidationError

    from ..config import ModelConfig

    try:
        ModelConfig(name=model)
    except ValidationError as exc:
        raise ActivelabError(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None


def _train_config(values: dict):
    from pydantic import ValidationError

    from ..config import TrainConfig

    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ActivelabError(f"invalid training settings: {exc}") from exc
