"""Dataset sources: find the files on disk first, download them (MD5-checked) only when they are nowhere.

``load_split(name, "train" | "test")`` returns an in-memory :class:`ArrayDataset` (uint8 images) for every
dataset except ``imagenet``, which is an ImageFolder over ``train/<wnid>/`` and ``val/<wnid>/``.

Where files are looked for, in order (each with the dataset's folder names, e.g. ``fashion_mnist`` and
``fashion-mnist``):

1. ``root`` itself, then ``root/<name>`` (when ``root`` is given, only these two: a ``root`` that lacks the files
   is an error, or the download target, never a silent fall back to another copy);
2. ``$ACTIVELAB_DATA/<name>``;
3. ``~/.cache/activelab/<name>`` (``$XDG_CACHE_HOME/activelab/<name>`` when that is set);
4. ``/usr/share/datasets/<name>`` (the Debian ``fashion-mnist`` package installs there).

Only when none holds the files and ``download`` is true are they downloaded from torchvision's URLs, with its
MD5 checksums, into ``root`` when given, otherwise into the cache folder. A failed download or a missing
dataset raises :class:`DatasetNotFoundError` naming the files expected and every folder searched.

Datasets:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 scaled to 0..255). The test split
  is a fixed class-balanced draw of 50 images per class (500, ``carve_validation`` with seed 0); train is the
  other 1,297. No files, always available.
- ``mnist``, ``fashion_mnist``: IDX files (``train-images-idx3-ubyte.gz`` ...), gzipped or plain.
- ``cifar10``: the python pickle batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``).
- ``svhn``: ``train_32x32.mat`` / ``test_32x32.mat`` (label 10 is digit 0). ``svhn_full``: the train split is
  train + ``extra_32x32.mat`` (604,388 images, FK's protocol carves validation from it); test as ``svhn``.
- ``imagenet``: ILSVRC-2012 as class folders; never downloaded (it needs registration at image-net.org).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, MNIST, SVHN, FashionMNIST
from torchvision.datasets.utils import download_and_extract_archive, download_url

from ..errors import ActivelabError, DatasetNotFoundError
from ..plugins import is_plugin, load_plugin
from .arrays import ArrayDataset

Split = Literal["train", "test"]

ENV_VAR = "ACTIVELAB_DATA"
SYSTEM_DIRS: list[Path] = [Path("/usr/share/datasets")]
"""Folders holding system-wide datasets (``<dir>/<name>``); tests replace this list."""


def cache_root() -> Path:
    """``~/.cache/activelab`` (or ``$XDG_CACHE_HOME/activelab``): where downloads go."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "activelab"


@dataclass(frozen=True)
class Remote:
    """A downloadable file: tried from each URL in turn, kept only if its MD5 matches."""

    filename: str
    urls: tuple[str, ...]
    md5: str
    extract: bool = False


class Source:
    """Finds, downloads and parses one dataset. Subclasses define the files and the parser."""

    name: str = ""
    folders: tuple[str, ...] = ()  # folder names searched under each base folder; the first receives downloads
    subdirs: tuple[str, ...] = ("",)  # where inside a found folder the files may sit
    remotes: tuple[Remote, ...] = ()
    files_note: str = ""  # shown after the expected file names, e.g. "(plain files work too)"
    no_download: str = ""  # why a dataset without remotes cannot be downloaded

    # --- to define in subclasses -------------------------------------------------------------------------
    def files(self, split: Split) -> list[str]:
        """The file names a split needs (for messages and for matching remotes)."""
        raise NotImplementedError

    def has_split(self, folder: Path, split: Split) -> bool:
        return all((folder / f).exists() for f in self.files(split))

    def read(self, folder: Path, split: Split) -> Dataset:
        raise NotImplementedError

    # --- shared machinery ---------------------------------------------------------------------------------
    def search_dirs(self, root: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
        """Candidate base folders in search order, each with a short label for messages."""
        out: list[tuple[Path, str]] = []
        if root is not None:
            root = Path(root).expanduser()
            out.append((root, "root"))
            out += [(root / f, "root") for f in self.folders]
            return out  # a given root is the only place looked at
        env = os.environ.get(ENV_VAR)
        if env:
            out += [(Path(env).expanduser() / f, f"${ENV_VAR}") for f in self.folders]
        out += [(cache_root() / f, "cache") for f in self.folders]
        out += [(d / f, "system") for d in SYSTEM_DIRS for f in self.folders]
        return out

    def locate(self, split: Split, root: str | os.PathLike | None = None) -> Path | None:
        """The first folder holding every file of ``split``, or None."""
        for base, _ in self.search_dirs(root):
            for sub in self.subdirs:
                folder = base / sub if sub else base
                if folder.is_dir() and self.has_split(folder, split):
                    return folder
        return None

    def download_dir(self, root: str | os.PathLike | None = None) -> Path:
        return Path(root).expanduser() if root is not None else cache_root() / self.folders[0]

    def load(self, split: Split, root: str | os.PathLike | None = None, download: bool = True) -> Dataset:
        if split not in ("train", "test"):
            raise ActivelabError(f"split must be 'train' or 'test', got {split!r}")
        folder = self.locate(split, root)
        if folder is None:
            if not download:
                raise self.not_found(split, root, "Downloading is disabled (download: false).")
            if not self.remotes:
                raise self.not_found(split, root, f"{self.name} cannot be downloaded automatically. {self.no_download}")
            target = self.download_dir(root)
            created = not target.exists()
            try:
                self.download(split, target)
            except Exception as exc:  # noqa: BLE001 - any failure becomes one actionable message
                if created and target.is_dir() and not any(target.iterdir()):
                    target.rmdir()  # leave no empty folder behind
                raise self.not_found(split, root, f"Downloading into {target} failed: {exc}") from exc
            folder = next(
                (target / s if s else target for s in self.subdirs if self.has_split(target / s, split)), None
            )
            if folder is None:
                raise self.not_found(split, root, f"The download into {target} did not produce the files.")
        try:
            return self.read(folder, split)
        except ActivelabError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ActivelabError(
                f"could not read the {split} split of {self.name} from {folder}: {exc}. "
                "The files may be truncated or in another format: delete them and let activelab download "
                "them, or replace them."
            ) from exc

    def download(self, split: Split, target: Path) -> None:
        """Fetch the remotes a split needs into ``target``; each is MD5-checked, a corrupt file is deleted."""
        needed = set(self.files(split))
        for remote in self.remotes:
            if remote.extract or remote.filename in needed:
                _fetch(remote, target)

    def not_found(self, split: Split, root: str | os.PathLike | None, reason: str) -> DatasetNotFoundError:
        files = ", ".join(self.files(split))
        note = f" {self.files_note}" if self.files_note else ""
        searched = []
        for base, label in self.search_dirs(root):
            where = [str(base / s) if s else str(base) for s in self.subdirs]
            searched.append(f"  {' or '.join(where)}  [{label}]")
        if root is None and not os.environ.get(ENV_VAR):
            searched.append(f"  (${ENV_VAR} is not set)")
        home = self.download_dir(None)
        return DatasetNotFoundError(
            f"dataset {self.name!r} ({split} split) was not found. Expected {files}{note} in one of:\n"
            + "\n".join(searched)
            + f"\n{reason}\n"
            + (
                f"Put {files} in {root} (dataset.root), or remove dataset.root to use the usual places."
                if root is not None
                else f"Put {files} in {home}, or set {ENV_VAR} so that ${ENV_VAR}/{self.folders[0]} "
                "holds them, or give dataset.root."
            )
        )

    def status(self) -> dict:
        train, test = self.locate("train"), self.locate("test")
        location = train or test
        files = ", ".join(dict.fromkeys(self.files("train") + self.files("test")))
        note = f"files: {files}{(' ' + self.files_note) if self.files_note else ''}"
        if self.remotes:
            note += f"; downloaded into {self.download_dir(None)} when missing"
        else:
            note += f"; put them in {self.download_dir(None)} or ${ENV_VAR}/{self.folders[0]}"
        if (train is None) != (test is None):
            note += f"; only the {'train' if train else 'test'} split was found"
        return {
            "name": self.name,
            "available": train is not None and test is not None,
            "location": str(location) if location else None,
            "note": note,
        }


def _fetch(remote: Remote, target: Path) -> None:
    errors = []
    for url in remote.urls:
        try:
            if remote.extract:
                download_and_extract_archive(url, str(target), filename=remote.filename, md5=remote.md5)
            else:
                download_url(url, str(target), filename=remote.filename, md5=remote.md5)
            return
        except Exception as exc:  # noqa: BLE001
            partial = target / remote.filename
            if partial.exists():
                partial.unlink()  # never leave a truncated or corrupt file where a later search would find it
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
    raise RuntimeError("; ".join(errors))


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------------


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """A uint8 IDX file (gzipped when the name ends in ``.gz``) as a numpy array.

    torchvision's ``read_image_file`` reads plain files only and checks the header with asserts, so the few
    lines are here, with the magic number checked: bytes 0-1 zero, byte 2 = 0x08 (uint8), byte 3 = ``ndim``.
    """
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim or data[0:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise ActivelabError(
            f"{path} is not a uint8 IDX file with {ndim} dimension(s) (magic number "
            f"{data[:4].hex() or 'missing'}, expected 000008{ndim:02x})"
        )
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ActivelabError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape)


class IdxSource(Source):
    files_note = "(gzipped or plain)"

    def __init__(self, name, folders, tv_class, classes, mean, std) -> None:
        self.name, self.folders, self.classes = name, tuple(folders), list(classes)
        self.mean, self.std = [mean], [std]
        self.remotes = tuple(
            Remote(fname, tuple(m + fname for m in tv_class.mirrors), md5) for fname, md5 in tv_class.resources
        )

    def files(self, split: Split) -> list[str]:
        prefix = "train" if split == "train" else "t10k"
        return [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]

    @staticmethod
    def _find(folder: Path, gz_name: str) -> Path | None:
        for candidate in (folder / gz_name, folder / gz_name[: -len(".gz")]):
            if candidate.is_file():
                return candidate
        return None

    def has_split(self, folder: Path, split: Split) -> bool:
        return all(self._find(folder, f) is not None for f in self.files(split))

    def read(self, folder: Path, split: Split) -> ArrayDataset:
        image_file, label_file = (self._find(folder, f) for f in self.files(split))
        x = read_idx(image_file, 3)
        y = read_idx(label_file, 1)
        if len(x) != len(y):
            raise ActivelabError(f"{image_file} has {len(x)} images but {label_file} has {len(y)} labels")
        return ArrayDataset(
            torch.from_numpy(x.copy()).unsqueeze(1),
            y.astype(np.int64),
            self.mean,
            self.std,
            self.classes,
            self.name,
        )


# --- CIFAR-10 -------------------------------------------------------------------------------------


class Cifar10Source(Source):
    name = "cifar10"
    folders = ("cifar10", "cifar-10")
    subdirs = (CIFAR10.base_folder, "")
    remotes = (Remote(CIFAR10.filename, (CIFAR10.url,), CIFAR10.tgz_md5, extract=True),)
    files_note = f"(the python batches, inside {CIFAR10.base_folder}/)"
    mean = [0.4914, 0.4822, 0.4465]
    std = [0.2470, 0.2435, 0.2616]
    default_classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]

    def files(self, split: Split) -> list[str]:
        return [f for f, _ in (CIFAR10.train_list if split == "train" else CIFAR10.test_list)]

    def read(self, folder: Path, split: Split) -> ArrayDataset:
        xs, ys = [], []
        for fname in self.files(split):
            batch = _load_cifar_pickle(folder / fname)
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        classes = self.default_classes
        meta = folder / CIFAR10.meta["filename"]
        if meta.exists():
            classes = list(_load_cifar_pickle(meta)[CIFAR10.meta["key"]])
        x = torch.from_numpy(np.concatenate(xs))
        return ArrayDataset(x, np.concatenate(ys), self.mean, self.std, classes, self.name)


# What a CIFAR-10 python batch may hold besides dicts, lists, strings and numbers: numpy arrays.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only the types a CIFAR-10 batch is made of; any other global (a function to call, a class to
    build) is refused, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing {module}.{name}: a CIFAR-10 batch holds only dicts, lists and numpy arrays"
        )


def _load_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            out = _CifarUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as exc:
            raise ActivelabError(
                f"{path} is not a CIFAR-10 python batch ({exc}); the file may be damaged or crafted: delete it "
                "and let activelab download the dataset again"
            ) from None
    if not isinstance(out, dict):
        raise ActivelabError(f"{path} is not a CIFAR-10 python batch (it holds a {type(out).__name__})")
    return out


# --- SVHN -----------------------------------------------------------------------------------------


class SvhnSource(Source):
    files_note = "(the cropped-digit .mat files; label 10 is digit 0)"
    mean = [0.4377, 0.4438, 0.4728]
    std = [0.1980, 0.2010, 0.1970]

    def __init__(self, name: str, with_extra: bool) -> None:
        self.name, self.with_extra = name, with_extra
        self.folders = ("svhn", "svhn_full") if with_extra else ("svhn",)
        self.remotes = tuple(
            Remote(fname, (url,), md5)
            for key, (url, fname, md5) in SVHN.split_list.items()
            if with_extra or key != "extra"
        )

    def files(self, split: Split) -> list[str]:
        if split == "test":
            return ["test_32x32.mat"]
        return ["train_32x32.mat", "extra_32x32.mat"] if self.with_extra else ["train_32x32.mat"]

    def read(self, folder: Path, split: Split) -> ArrayDataset:
        import scipy.io

        paths = [folder / f for f in self.files(split)]
        sizes = [{name: shape for name, shape, _ in scipy.io.whosmat(p)}["X"][3] for p in paths]
        x = np.empty((sum(sizes), 3, 32, 32), dtype=np.uint8)  # filled file by file: svhn_full is 1.9 GB
        ys, start = [], 0
        for path, n in zip(paths, sizes, strict=True):
            mat = scipy.io.loadmat(path, variable_names=["X", "y"])
            x[start : start + n] = np.transpose(mat["X"], (3, 2, 0, 1))
            ys.append(np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10)  # label 10 means digit 0
            start += n
            del mat
        return ArrayDataset(torch.from_numpy(x), np.concatenate(ys), self.mean, self.std, _digit_names(), self.name)


# --- scikit-learn digits --------------------------------------------------------------------------


class DigitsSource(Source):
    name = "digits"
    folders = ("digits",)
    test_per_class = 50
    split_seed = 0
    # of the 1,297 training images, in [0, 1] (test_data_sources checks these against the data)
    mean = [0.3055]
    std = [0.3759]

    def files(self, split: Split) -> list[str]:
        return []

    def locate(self, split: Split, root=None) -> Path | None:
        return Path("scikit-learn")

    def read(self, folder: Path, split: Split) -> ArrayDataset:
        from sklearn.datasets import load_digits

        from .splits import carve_validation

        digits = load_digits()
        x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        y = digits.target.astype(np.int64)
        test, train = carve_validation(y, self.test_per_class, np.random.default_rng(self.split_seed))
        idx = train if split == "train" else test
        return ArrayDataset(torch.from_numpy(x[idx]), y[idx], self.mean, self.std, _digit_names(), self.name)

    def status(self) -> dict:
        return {
            "name": self.name,
            "available": True,
            "location": "bundled with scikit-learn",
            "note": "8x8 digits; train 1,297 / test 500 (50 per class, fixed seed); no files needed",
        }


# --- ImageNet -------------------------------------------------------------------------------------


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _imagenet_folder_class():
    from torchvision import datasets, transforms

    class ImageNetFolder(datasets.ImageFolder):
        """ImageFolder with a fixed class list (the train folder's), 224-pixel tensors and dataset metadata.

        Both splits use the deterministic evaluation transform (resize 256, centre crop 224, normalise):
        the pool is also what strategies score, so it must not be randomly augmented here; training applies
        its own augmentation on batches.
        """

        def __init__(self, folder: Path, class_names: list[str], name: str) -> None:
            self._class_names = class_names
            transform = transforms.Compose(
                [
                    transforms.Resize(256),
                    transforms.CenterCrop(224),
                    transforms.ToTensor(),
                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                ]
            )
            super().__init__(str(folder), transform=transform, allow_empty=True)
            self.name = name
            self.mean, self.std = list(IMAGENET_MEAN), list(IMAGENET_STD)
            self.in_channels, self.image_size = 3, 224

        def find_classes(self, directory):
            present = sorted(e.name for e in os.scandir(directory) if e.is_dir())
            unknown = sorted(set(present) - set(self._class_names))
            if unknown:
                raise ActivelabError(
                    f"{directory} has class folders that the train folder lacks: {unknown[:5]}"
                    f"{' ...' if len(unknown) > 5 else ''}"
                )
            return list(self._class_names), {c: i for i, c in enumerate(self._class_names)}

        @property
        def num_classes(self) -> int:
            return len(self.classes)

    return ImageNetFolder


class ImageNetSource(Source):
    name = "imagenet"
    folders = ("imagenet", "ILSVRC2012")
    no_download = "ILSVRC-2012 needs registration at https://image-net.org; get it there."
    files_note = "(one folder per class, e.g. train/n01440764/*.JPEG; val/ sorted into the same class folders)"

    def files(self, split: Split) -> list[str]:
        return ["train/<class>/*.JPEG"] if split == "train" else ["val/<class>/*.JPEG"]

    @staticmethod
    def _split_dir(split: Split) -> str:
        return "train" if split == "train" else "val"

    def has_split(self, folder: Path, split: Split) -> bool:
        d = folder / self._split_dir(split)
        return d.is_dir() and any(e.is_dir() for e in os.scandir(d))

    def read(self, folder: Path, split: Split) -> Dataset:
        names_from = folder / "train" if (folder / "train").is_dir() else folder / self._split_dir(split)
        class_names = sorted(e.name for e in os.scandir(names_from) if e.is_dir())
        return _imagenet_folder_class()(folder / self._split_dir(split), class_names, self.name)


# --- registry -------------------------------------------------------------------------------------


def _digit_names() -> list[str]:
    return [str(i) for i in range(10)]


DATASETS: dict[str, Source] = {
    "digits": DigitsSource(),
    "mnist": IdxSource("mnist", ("mnist",), MNIST, _digit_names(), 0.1307, 0.3081),
    "fashion_mnist": IdxSource(
        "fashion_mnist",
        ("fashion_mnist", "fashion-mnist"),
        FashionMNIST,
        FashionMNIST.classes,
        0.2860,
        0.3530,
    ),
    "svhn": SvhnSource("svhn", with_extra=False),
    "svhn_full": SvhnSource("svhn_full", with_extra=True),
    "cifar10": Cifar10Source(),
    "imagenet": ImageNetSource(),
}
"""Every dataset ``load_split`` knows, by name."""


SOURCE_KINDS: dict[str, str] = {
    "image_folder": "activelab.project.sources:UserFolderSource",
    "image_csv": "activelab.project.sources:UserCsvSource",
    "arrays": "activelab.project.sources:UserArraysSource",
}
"""Dataset kinds that read the user's own files (``dataset.root``): name -> ``module:Source class``, imported
when first asked for."""


def register_source(name: str, target: str) -> None:
    """Add a dataset kind: ``target`` is ``"module:SourceClass"`` (a :class:`Source` subclass, built without
    arguments); ``load_split(name, ...)`` then reads through it."""
    SOURCE_KINDS[name] = target


def get_source(name: str) -> Source:
    if name not in DATASETS and name in SOURCE_KINDS:
        import importlib

        module, _, attr = SOURCE_KINDS[name].partition(":")
        return getattr(importlib.import_module(module), attr)()
    if name not in DATASETS:
        raise ActivelabError(f"unknown dataset {name!r}; known: {', '.join([*DATASETS, *SOURCE_KINDS])}")
    return DATASETS[name]


def load_split(name: str, split: Split, root: str | None = None, download: bool = True) -> Dataset:
    """The ``train`` or ``test`` split of dataset ``name``.

    An :class:`ArrayDataset` (uint8 images, int64 labels, normalisation, class names) for every dataset except
    ``imagenet`` (an ImageFolder with ``targets`` and ``classes``). Raises :class:`DatasetNotFoundError` when
    the files are missing and cannot be downloaded; the message says which files to put where.
    """
    if is_plugin(name):
        return _plugin_split(name, split, root)
    return get_source(name).load(split, root, download)


def split_location(name: str, split: Split, root: str | None = None) -> str | None:
    """The folder the files of ``split`` are read from (what :func:`load_split` would use), or None (a
    dataset source of the user's own: its ``root``, as given)."""
    if is_plugin(name):
        return None if root is None else str(root)
    folder = get_source(name).locate(split, root)
    return None if folder is None else str(folder)


def _plugin_split(name: str, split: Split, root: str | None) -> Dataset:
    """A dataset source of the user's own: ``source(split, root)`` returning a torch Dataset of ``(x, y)``."""
    source = load_plugin(name, "dataset")
    if not callable(source):
        raise ActivelabError(f"dataset {name!r} is not callable: name a function source(split, root) -> Dataset")
    dataset = source(split, root)
    if not isinstance(dataset, Dataset):
        raise ActivelabError(f"dataset source {name!r} returned {type(dataset).__name__}, not a torch Dataset")
    return dataset


def dataset_status() -> list[dict]:
    """One dict per dataset: ``name``, ``available`` (both splits on disk), ``location``, ``note``."""
    return [source.status() for source in DATASETS.values()]
