"""Sources for a user's own data: a folder of images, a CSV of ``path,label``, and ``.npy`` / ``.npz`` arrays.

Three steps, kept apart so that labels never need an image decoded:

1. *list* the files and their labels (:func:`scan_folder`, :func:`read_label_csv`): paths and class names
   only, no image is opened;
2. *decode* each file once through a declared :class:`ImageTransform` (size chosen by the user, RGB or
   grayscale; RGBA is composited on white, palette and 16-bit images are converted), in worker threads
   (:func:`decode_files`); unreadable or corrupt files are returned as a list and skipped with a warning;
3. wrap the uint8 images in an :class:`~activelab.data.arrays.ArrayDataset`.

The same readers serve the labeling projects (:mod:`activelab.project.core`) and the ``dataset:`` kinds of
experiment configs (``image_folder``, ``image_csv``, ``arrays``, listed in
:data:`activelab.data.sources.SOURCE_KINDS`); see :class:`UserFolderSource`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..data.arrays import ArrayDataset
from ..data.sources import Source, Split
from ..errors import ActivelabError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
"""File name endings taken as images (case-insensitive)."""

Mode = Literal["RGB", "L"]


class CorruptFilesWarning(UserWarning):
    """Some files could not be decoded; they were skipped (the warning lists them)."""


@dataclass(frozen=True)
class ImageTransform:
    """How every image becomes a ``(C, size, size)`` uint8 array.

    - ``size``: the side in pixels (square). ``fit="pad"`` keeps the aspect ratio and pads with black;
      ``fit="crop"`` crops the centre; ``fit="stretch"`` resizes both sides to ``size``.
    - ``mode``: ``"RGB"`` (3 channels) or ``"L"`` (grayscale, 1 channel). RGBA and LA are composited on white
      first, so transparent backgrounds do not turn black.
    """

    size: int = 64
    mode: Mode = "RGB"
    fit: Literal["pad", "crop", "stretch"] = "pad"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 2:
            raise ActivelabError(f"image size must be an integer >= 2 pixels; got {self.size!r}")
        if self.mode not in ("RGB", "L"):
            raise ActivelabError(f"image mode must be 'RGB' or 'L' (grayscale); got {self.mode!r}")
        if self.fit not in ("pad", "crop", "stretch"):
            raise ActivelabError(f"fit must be 'pad', 'crop' or 'stretch'; got {self.fit!r}")

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    @property
    def nbytes(self) -> int:
        return self.channels * self.size * self.size

    def apply(self, data: bytes) -> np.ndarray:
        """Decode the bytes of one image file into a ``(C, size, size)`` uint8 array; raises on a bad file."""
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data)) as im:
            im.draft(self.mode, (self.size, self.size))  # JPEG: decode at a reduced scale when it can
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = arr.max() if arr.size and arr.max() > 0 else 1.0
                im = Image.fromarray(np.rint(arr * (255.0 / top)).astype(np.uint8))
            im = im.convert(self.mode)
            target = (self.size, self.size)
            if self.fit == "pad":
                im = ImageOps.pad(im, target, method=Image.BILINEAR, color=0)
            elif self.fit == "crop":
                im = ImageOps.fit(im, target, method=Image.BILINEAR)
            else:
                im = im.resize(target, Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[None]
        else:
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr)


def content_id(data: bytes) -> str:
    """The stable identity of a file: the SHA-256 of its bytes, hex, first 24 characters (96 bits)."""
    return hashlib.sha256(data).hexdigest()[:24]


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def scan_folder(root: str | os.PathLike) -> list[tuple[str, str | None]]:
    """``(relative path, class name or None)`` of every image under ``root``, sorted by path; no image decoded.

    Layout: files directly in ``root`` are unlabeled; files in a sub-folder are labeled with the name of the
    top-level sub-folder (``root/boot/a.jpg`` -> ``boot``; deeper folders keep that class). Hidden files and
    folders (starting with ``.``) are ignored.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ActivelabError(f"{root} is not a folder of images")
    out: list[tuple[str, str | None]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        label = rel_dir.parts[0] if rel_dir.parts else None
        for name in sorted(filenames):
            if not name.startswith(".") and is_image(name):
                out.append(((rel_dir / name).as_posix(), label))
    out.sort(key=lambda t: t[0])
    return out


def read_label_csv(
    path: str | os.PathLike, classes: Sequence[str] | None = None
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Rows ``(path, class name or None)`` of a CSV with columns ``path,label`` and the class list.

    - A header row is recognised when its first cell is ``path`` (or ``file``/``filename``); otherwise every
      row is data. Paths are kept as written (relative ones are relative to the CSV's folder: see
      :func:`resolve_csv_path`).
    - An empty label means unlabeled.
    - ``classes``: the known class names. A label outside them is an error naming the line. Without
      ``classes``, the classes are the sorted distinct labels of the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ActivelabError(f"label file {path} does not exist")
    rows: list[tuple[str, str | None]] = []
    lines: list[int] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            if lineno == 1 and row[0].strip().lower() in ("path", "file", "filename"):
                continue
            if len(row) > 2:
                raise ActivelabError(f"{path} line {lineno}: expected 2 columns (path,label), found {len(row)}")
            file_path = row[0].strip()
            label = row[1].strip() if len(row) > 1 else ""
            rows.append((file_path, label or None))
            lines.append(lineno)
    if classes is None:
        classes = sorted({label for _, label in rows if label is not None})
    known = set(classes)
    for (file_path, label), lineno in zip(rows, lines):
        if label is not None and label not in known:
            raise ActivelabError(
                f"{path} line {lineno}: unknown class {label!r} for {file_path}; the classes are "
                f"{', '.join(classes)}. Fix the label, or add the class (--classes)."
            )
    return rows, list(classes)


def resolve_csv_path(csv_path: str | os.PathLike, file_path: str) -> Path:
    """A path written in a label CSV: absolute as is, relative to the CSV's folder otherwise."""
    p = Path(file_path).expanduser()
    return p if p.is_absolute() else Path(csv_path).expanduser().resolve().parent / p


def read_and_decode(path: Path, transform: ImageTransform) -> tuple[str, int, np.ndarray | None, str | None]:
    """``(content id, size in bytes, image or None, error or None)`` of one file, read once and decoded once."""
    data = path.read_bytes()
    try:
        image = transform.apply(data)
        error = None
    except Exception as exc:  # noqa: BLE001 - a corrupt file is reported, never a crash
        image, error = None, f"{type(exc).__name__}: {exc}"
    return content_id(data), len(data), image, error


def decode_files(
    paths: Sequence[Path], transform: ImageTransform, workers: int | None = None
) -> Iterable[tuple[Path, str | None, int, np.ndarray | None, str | None]]:
    """Yield ``(path, content id, size, image or None, error or None)`` for each path, in order.

    Files are read and decoded in a thread pool (Pillow releases the GIL while decoding). A file that cannot be
    read (missing, permission) gives id None and the error.
    """

    def one(p: Path):
        try:
            return (p, *read_and_decode(p, transform))
        except OSError as exc:
            return p, None, 0, None, f"{type(exc).__name__}: {exc}"

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 16:
        yield from map(one, paths)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(one, paths, chunksize=64)


def warn_corrupt(bad: Sequence[tuple[str, str]], what: str = "") -> None:
    """One warning listing the skipped files (the first 10, then a count)."""
    if not bad:
        return
    listing = "; ".join(f"{p} ({err})" for p, err in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    warnings.warn(
        f"skipped {len(bad)} unreadable image(s){' in ' + what if what else ''}: {listing}{more}",
        CorruptFilesWarning,
        stacklevel=3,
    )


def images_dataset(
    files: Sequence[tuple[Path, str | None]],
    classes: Sequence[str],
    transform: ImageTransform,
    name: str = "",
    require_labels: bool = False,
) -> tuple[ArrayDataset, list[Path], list[tuple[str, str]]]:
    """Decode ``(path, class name or None)`` files into an ArrayDataset (label -1 for unlabeled).

    Returns ``(dataset, paths kept in dataset order, skipped (path, error))``; the skipped ones are warned about.
    """
    index = {c: i for i, c in enumerate(classes)}
    if require_labels:
        missing = [str(p) for p, label in files if label is None]
        if missing:
            raise ActivelabError(
                f"{len(missing)} file(s) have no label (e.g. {missing[0]}); an experiment needs every image labeled"
            )
    labels = {p: label for p, label in files}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    kept: list[Path] = []
    bad: list[tuple[str, str]] = []
    for path, _cid, _size, image, error in decode_files([p for p, _ in files], transform):
        if image is None:
            bad.append((str(path), error or "unreadable"))
            continue
        xs.append(image)
        label = labels[path]
        ys.append(index[label] if label is not None else -1)
        kept.append(path)
    warn_corrupt(bad, name)
    if not xs:
        raise ActivelabError(f"no readable image found{' in ' + name if name else ''}")
    x = torch.from_numpy(np.stack(xs))
    mean, std = [0.5] * transform.channels, [0.25] * transform.channels
    return ArrayDataset(x, np.asarray(ys, dtype=np.int64), mean, std, list(classes), name), kept, bad


def load_arrays(path: str | os.PathLike, classes: Sequence[str] | None = None) -> ArrayDataset:
    """An ``.npz`` (arrays ``x`` and optional ``y``; ``classes`` optional) or ``.npy`` (images only) file.

    Images: (N, H, W), (N, H, W, C) with C in 1..4 or (N, C, H, W), uint8 (0..255) or float (0..1). Labels:
    int (-1 = unlabeled) or strings (class names; empty = unlabeled).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ActivelabError(f"array file {path} does not exist")
    y: np.ndarray | None = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise ActivelabError(f"{path} has no array 'x' (found {', '.join(z.files)}); save x=images, y=labels")
            x = z["x"]
            y = z["y"] if "y" in z else None
            if classes is None and "classes" in z:
                classes = [str(c) for c in z["classes"]]
    elif path.suffix == ".npy":
        x = np.load(path, allow_pickle=False)
    else:
        raise ActivelabError(f"{path}: arrays must be .npy (images) or .npz (x, y)")
    x = _channels_first(np.asarray(x), path)
    if y is None:
        labels = np.full(len(x), -1, dtype=np.int64)
    elif y.dtype.kind in "US":
        names = [str(v) for v in y]
        if classes is None:
            classes = sorted({n for n in names if n})
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({n for n in names if n and n not in index})
        if unknown:
            raise ActivelabError(f"{path}: unknown class name(s) {unknown[:5]}; the classes are {list(classes)}")
        labels = np.asarray([index[n] if n else -1 for n in names], dtype=np.int64)
    else:
        labels = np.asarray(y, dtype=np.int64).reshape(-1)
    if len(labels) != len(x):
        raise ActivelabError(f"{path}: {len(x)} images but {len(labels)} labels")
    if classes is None:
        top = int(labels.max()) if labels.size else -1
        classes = [str(i) for i in range(max(top + 1, 1))]
    if labels.size and (labels.min() < -1 or labels.max() >= len(classes)):
        raise ActivelabError(f"{path}: labels must lie in -1..{len(classes) - 1}; found {labels.min()}..{labels.max()}")
    c = x.shape[1]
    return ArrayDataset(torch.from_numpy(x), labels, [0.5] * c, [0.25] * c, list(classes), path.stem)


def _channels_first(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 2, 3, 4) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise ActivelabError(f"{path}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W); got {x.shape}")
    if x.shape[1] in (2, 4):
        x = x[:, :-1]  # drop alpha
    if x.dtype != np.uint8:
        if x.dtype.kind != "f":
            raise ActivelabError(f"{path}: images must be uint8 (0..255) or float (0..1); got {x.dtype}")
        x = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(x)


def array_to_image_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """A ``(C, H, W)`` uint8 image encoded as PNG (for the labeling page's thumbnails)."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=fmt, compress_level=1)
    return buf.getvalue()


# --- dataset kinds for experiment configs ---------------------------------------------------------------


def _hash_split(path: Path, test_percent: int = 20) -> Split:
    """A fixed test share chosen by the path's name hash: the same file is always on the same side."""
    digest = hashlib.sha256(path.name.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 100 < test_percent else "train"


def read_source_options(root: Path) -> ImageTransform:
    """The declared transform of a user dataset folder: ``root/activelab-source.yaml`` (size, mode, fit)."""
    import yaml

    options = root / "activelab-source.yaml"
    if not options.is_file():
        return ImageTransform()
    spec = yaml.safe_load(options.read_text()) or {}
    unknown = set(spec) - {"size", "mode", "fit"}
    if unknown:
        raise ActivelabError(f"{options}: unknown key(s) {sorted(unknown)}; valid: size, mode, fit")
    return ImageTransform(**spec)


class _UserSource(Source):
    """A dataset kind over the user's files; ``dataset.root`` names them and nothing is downloaded.

    Splits: ``root/train`` and ``root/test`` when both exist, otherwise one set divided by a fixed hash of the
    file names (20% test). The transform (default 64-pixel RGB, aspect kept) is declared in
    ``root/activelab-source.yaml`` (``size: 32``, ``mode: L``, ``fit: pad|crop|stretch``).
    """

    kind_note = ""

    def files(self, split: Split) -> list[str]:
        return [self.kind_note]

    def status(self) -> dict:
        return {
            "name": self.name,
            "available": False,
            "location": None,
            "note": f"your own data: {self.kind_note}; give dataset.root",
        }

    def load(self, split: Split, root: str | os.PathLike | None = None, download: bool = True):
        if split not in ("train", "test"):
            raise ActivelabError(f"split must be 'train' or 'test', got {split!r}")
        if root is None:
            raise ActivelabError(f"dataset {self.name!r} reads your own files: set dataset.root ({self.kind_note})")
        root = Path(root).expanduser()
        if not root.exists():
            raise ActivelabError(f"dataset.root {root} does not exist ({self.kind_note})")
        return self.read_user(root, split)

    def read_user(self, root: Path, split: Split) -> ArrayDataset:
        raise NotImplementedError


class UserFolderSource(_UserSource):
    """``image_folder``: one sub-folder per class (``root/<class>/*.png``), or ``root/train`` + ``root/test``."""

    name = "image_folder"
    kind_note = "one sub-folder of images per class"

    def read_user(self, root: Path, split: Split) -> ArrayDataset:
        transform = read_source_options(root)
        if (root / "train").is_dir() and (root / "test").is_dir():
            base = root / split
            files = scan_folder(base)
            classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir() and not e.name.startswith("."))
        else:
            base = root
            files = [(p, c) for p, c in scan_folder(root) if _hash_split(Path(p)) == split]
            classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        unknown = sorted({c for _, c in files if c is not None and c not in classes})
        if unknown:
            raise ActivelabError(f"{base} has class folders the train folder lacks: {unknown[:5]}")
        full = [(base / p, c) for p, c in files]
        return images_dataset(full, classes, transform, f"{self.name}:{base}", require_labels=True)[0]


class UserCsvSource(_UserSource):
    """``image_csv``: ``root/labels.csv`` (or ``root/train.csv`` + ``root/test.csv``) of ``path,label``."""

    name = "image_csv"
    kind_note = "a CSV of path,label (labels.csv, or train.csv and test.csv)"

    def read_user(self, root: Path, split: Split) -> ArrayDataset:
        transform = read_source_options(root)
        if (root / "train.csv").is_file() and (root / "test.csv").is_file():
            _, classes = read_label_csv(root / "train.csv")
            csv_path = root / f"{split}.csv"
            rows, _ = read_label_csv(csv_path, classes)
        else:
            csv_path = root / "labels.csv" if root.is_dir() else root
            rows, classes = read_label_csv(csv_path)
            rows = [(p, c) for p, c in rows if _hash_split(Path(p)) == split]
        full = [(resolve_csv_path(csv_path, p), c) for p, c in rows]
        return images_dataset(full, classes, transform, f"{self.name}:{csv_path}", require_labels=True)[0]


class UserArraysSource(_UserSource):
    """``arrays``: ``root/train.npz`` and ``root/test.npz``, each with ``x`` (images) and ``y`` (labels)."""

    name = "arrays"
    kind_note = "train.npz and test.npz with arrays x and y"

    def read_user(self, root: Path, split: Split) -> ArrayDataset:
        path = root / f"{split}.npz"
        if not path.is_file():
            raise ActivelabError(f"dataset 'arrays' needs {path} (arrays x and y)")
        classes = None
        if split == "test" and (root / "train.npz").is_file():
            classes = load_arrays(root / "train.npz").classes
        data = load_arrays(path, classes)
        if (data.y < 0).any():
            raise ActivelabError(f"{path}: {int((data.y < 0).sum())} image(s) have no label; an experiment needs all")
        return data
