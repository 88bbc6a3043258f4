"""Dataset sources: tiny files in the real on-disk formats, loaded through ``load_split``."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.utils as tv_utils
from PIL import Image

from activelab.data import sources
from activelab.data.arrays import ArrayDataset
from activelab.data.sources import DATASETS, dataset_status, load_split, read_idx
from activelab.errors import ActivelabError, DatasetNotFoundError

REAL_SYSTEM_DIRS = list(sources.SYSTEM_DIRS)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No ACTIVELAB_DATA, a private cache, a private system folder: only what a test writes is found."""
    monkeypatch.delenv("ACTIVELAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [tmp_path / "system"])


# --- writers for the real formats (independent of the parsers under test) -------------------------


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(folder: Path, gz: bool = True, n_train: int = 7, n_test: int = 3, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    r = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = r.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = r.integers(0, 10, n).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", y)
        out[prefix] = (x, y)
    return out


def write_cifar(folder: Path, per_batch: int = 2) -> dict:
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    r = np.random.default_rng(1)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = r.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in r.integers(0, 10, per_batch)]
        if k == 0:  # first image: red plane 10, green 20, blue 30 (rows are R then G then B, 1024 each)
            data[0] = np.repeat([10, 20, 30], 1024)
        with open(batches / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": []}, f)
        out[name] = (data, labels)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f)
    return out


def write_svhn(folder: Path, splits=("train", "test", "extra")) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    r = np.random.default_rng(2)
    out = {}
    for k, split in enumerate(splits):
        n = 3 + k
        X = r.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [9], [5], [10]][:n], dtype=np.uint8)  # 10 means digit 0
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": X, "y": y})
        out[split] = (X, y)
    return out


# --- IDX ------------------------------------------------------------------------------------------


def test_idx_parser_reads_hand_written_bytes(tmp_path):
    labels = tmp_path / "labels"
    labels.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    assert read_idx(labels, 1).tolist() == [7, 0, 9]
    images = tmp_path / "images"
    images.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6)))
    assert read_idx(images, 3).tolist() == [[[0, 1, 2], [3, 4, 5]]]


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, gz):
    truth = write_mnist(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_split("mnist", split, root=str(tmp_path), download=False)
        x, y = truth[prefix]
        assert isinstance(ds, ArrayDataset)
        assert ds.x.shape == (len(x), 1, 28, 28) and ds.x.dtype == torch.uint8
        assert ds.y.dtype == torch.int64
        assert np.array_equal(ds.x[:, 0].numpy(), x)
        assert ds.targets.tolist() == y.tolist()
        assert ds.mean.tolist() == pytest.approx([0.1307]) and ds.std.tolist() == pytest.approx([0.3081])
        assert ds.classes == [str(i) for i in range(10)] and ds.name == "mnist"


def test_fashion_mnist_names_and_stats(tmp_path):
    truth = write_mnist(tmp_path / "fm", gz=False)
    ds = load_split("fashion_mnist", "test", root=str(tmp_path / "fm"), download=False)
    assert np.array_equal(ds.x[:, 0].numpy(), truth["t10k"][0])
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.mean.tolist() == pytest.approx([0.2860]) and ds.std.tolist() == pytest.approx([0.3530])
    # normalisation: pixel p becomes (p/255 - mean) / std
    x0, _ = ds[0]
    expected = (torch.from_numpy(truth["t10k"][0][0]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x0[0], expected, atol=1e-6)


def test_corrupt_idx_files_give_clear_errors(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0, 0, 1]))  # images magic in a labels file
    with pytest.raises(ActivelabError, match="magic number"):
        load_split("mnist", "train", root=str(tmp_path), download=False)
    truncated = tmp_path / "t10k-images-idx3-ubyte.gz"
    truncated.unlink()
    write_idx(truncated.with_suffix(""), np.zeros((3, 28, 28), np.uint8))
    plain = truncated.with_suffix("")
    plain.write_bytes(plain.read_bytes()[:-5])
    with pytest.raises(ActivelabError, match="truncated"):
        load_split("mnist", "test", root=str(tmp_path), download=False)


def test_search_order_root_env_cache_system(tmp_path, monkeypatch):
    system = write_mnist(tmp_path / "system" / "mnist", seed=1)
    assert np.array_equal(load_split("mnist", "train", download=False).x[:, 0].numpy(), system["train"][0])
    cache = write_mnist(tmp_path / "xdg" / "activelab" / "mnist", seed=2)
    assert np.array_equal(load_split("mnist", "train", download=False).x[:, 0].numpy(), cache["train"][0])
    env = write_mnist(tmp_path / "env" / "mnist", seed=3)
    monkeypatch.setenv("ACTIVELAB_DATA", str(tmp_path / "env"))
    assert np.array_equal(load_split("mnist", "train", download=False).x[:, 0].numpy(), env["train"][0])
    root = write_mnist(tmp_path / "root", seed=4)
    got = load_split("mnist", "train", root=str(tmp_path / "root"), download=False)
    assert np.array_equal(got.x[:, 0].numpy(), root["train"][0])
    # root/<name> works too, and the hyphenated system name of fashion_mnist is searched
    write_mnist(tmp_path / "data" / "mnist", seed=5)
    assert len(load_split("mnist", "test", root=str(tmp_path / "data"), download=False)) == 3
    write_mnist(tmp_path / "system" / "fashion-mnist", seed=6, n_train=4)
    assert len(load_split("fashion_mnist", "train", download=False)) == 4


# --- CIFAR-10, SVHN, ImageNet ---------------------------------------------------------------------


def test_cifar10_pickle_batches(tmp_path):
    truth = write_cifar(tmp_path)
    train = load_split("cifar10", "train", root=str(tmp_path), download=False)
    assert train.x.shape == (10, 3, 32, 32) and train.x.dtype == torch.uint8
    assert train.targets.tolist() == sum((truth[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.x[0, 0].unique().tolist() == [10] and train.x[0, 1].unique().tolist() == [20]
    assert train.x[0, 2].unique().tolist() == [30]
    data = truth["data_batch_3"][0]
    assert np.array_equal(train.x[5].numpy(), data[1].reshape(3, 32, 32))
    # row r, column c of the green plane is byte 1024 + 32 r + c
    assert int(train.x[5, 1, 2, 7]) == int(data[1][1024 + 32 * 2 + 7])
    assert train.classes == [f"c{i}" for i in range(10)]
    assert train.mean.tolist() == pytest.approx([0.4914, 0.4822, 0.4465])
    test = load_split("cifar10", "test", root=str(tmp_path / "cifar-10-batches-py"), download=False)
    assert test.targets.tolist() == truth["test_batch"][1] and len(test) == 2


def test_svhn_mat_files(tmp_path):
    truth = write_svhn(tmp_path)
    train = load_split("svhn", "train", root=str(tmp_path), download=False)
    X = truth["train"][0]
    assert train.x.shape == (3, 3, 32, 32) and train.x.dtype == torch.uint8
    assert train.targets.tolist() == [0, 1, 9]  # 10 -> 0
    assert int(train.x[2, 1, 5, 7]) == int(X[5, 7, 1, 2])  # x[n, c, h, w] == X[h, w, c, n]
    assert np.array_equal(train.x.numpy(), X.transpose(3, 2, 0, 1))
    full = load_split("svhn_full", "train", root=str(tmp_path), download=False)
    assert len(full) == 3 + 5 and full.targets.tolist() == [0, 1, 9, 0, 1, 9, 5, 0]
    assert np.array_equal(full.x[3:].numpy(), truth["extra"][0].transpose(3, 2, 0, 1))
    test = load_split("svhn_full", "test", root=str(tmp_path), download=False)
    assert test.targets.tolist() == [0, 1, 9, 5] and full.name == "svhn_full"


def test_svhn_full_needs_extra(tmp_path):
    write_svhn(tmp_path, splits=("train", "test"))
    assert len(load_split("svhn", "train", root=str(tmp_path), download=False)) == 3
    with pytest.raises(DatasetNotFoundError, match="extra_32x32.mat"):
        load_split("svhn_full", "train", root=str(tmp_path), download=False)


def test_imagenet_folders(tmp_path):
    colours = {
        "train/n002/a.png": (255, 0, 0),
        "train/n002/b.JPEG": (0, 0, 255),
        "train/n001/c.png": (0, 255, 0),
    }
    colours["val/n002/d.png"] = (10, 20, 30)
    for rel, rgb in colours.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 9), rgb).save(tmp_path / rel, format="JPEG" if rel.endswith("JPEG") else "PNG")
    (tmp_path / "val" / "n001").mkdir()
    train = load_split("imagenet", "train", root=str(tmp_path), download=False)
    assert train.classes == ["n001", "n002"] and list(train.targets) == [0, 1, 1]
    x, y = train[0]
    assert x.shape == (3, 224, 224) and y == 0
    green = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[:, 100, 100], green, atol=1e-5)
    val = load_split("imagenet", "test", root=str(tmp_path), download=False)
    assert val.classes == ["n001", "n002"] and list(val.targets) == [1]  # n001 empty: indices still aligned
    x, _ = val[0]
    expect = (torch.tensor([10, 20, 30]) / 255.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    assert torch.allclose(x[:, 50, 50], expect, atol=1e-5)


def test_imagenet_missing_is_not_downloaded(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded") as info:
        load_split("imagenet", "train", root=str(tmp_path))
    assert "train/<class>/*.JPEG" in str(info.value)


# --- missing data and downloads -------------------------------------------------------------------


def test_missing_dataset_names_files_and_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "download_url", lambda *a, **k: pytest.fail("download: false must not download"))
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_split("mnist", "train", root=str(root), download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ActivelabError)
    for needle in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", str(root), "download: false"):
        assert needle in msg, needle
    assert "t10k" not in msg
    with pytest.raises(DatasetNotFoundError) as info:
        load_split("mnist", "train", download=False)
    msg = str(info.value)
    for needle in (str(tmp_path / "xdg" / "activelab" / "mnist"), str(tmp_path / "system" / "mnist"), "ACTIVELAB_DATA"):
        assert needle in msg, needle


def test_a_root_without_the_files_never_falls_back_to_another_copy(tmp_path):
    write_mnist(tmp_path / "system" / "mnist", seed=1)
    assert len(load_split("mnist", "train", download=False)) > 0  # the system copy is found without a root
    with pytest.raises(DatasetNotFoundError, match=r"only|dataset\.root") as info:
        load_split("mnist", "train", root=str(tmp_path / "empty"), download=False)
    assert str(tmp_path / "system") not in str(info.value)
    assert sources.split_location("mnist", "train") == str(tmp_path / "system" / "mnist")


def test_cifar_batches_cannot_run_code(tmp_path):
    """A crafted batch whose unpickling would call a function is refused before anything runs."""
    write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(ActivelabError, match=r"test_batch.*refusing posix\.system|refusing os\.system"):
        load_split("cifar10", "test", root=str(tmp_path), download=False)
    assert not marker.exists()
    assert len(load_split("cifar10", "train", root=str(tmp_path), download=False)) > 0  # honest batches load


def test_failed_download_is_a_clean_error(tmp_path, monkeypatch):
    calls = []

    def offline(url, root, filename=None, md5=None):
        calls.append(url)
        os.makedirs(root, exist_ok=True)
        Path(root, filename).write_bytes(b"partial")  # a truncated file must not be left behind
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(sources, "download_url", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_split("fashion_mnist", "test")
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "no network" in msg and "failed" in msg
    cache = tmp_path / "xdg" / "activelab" / "fashion_mnist"
    assert str(cache) in msg and calls and not cache.exists()  # neither a partial file nor an empty folder


def _serve(monkeypatch, server: Path) -> list[str]:
    """Make torchvision's downloader copy files from ``server``, not the network (checksums still run)."""
    fetched: list[str] = []

    def urlretrieve(url, fpath, chunk_size=0):
        fetched.append(url)
        shutil.copyfile(server / os.path.basename(url), fpath)

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", urlretrieve)
    return fetched


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_checks_md5_then_loads_from_cache(tmp_path, monkeypatch):
    server = tmp_path / "server"
    truth = write_mnist(server)
    fetched = _serve(monkeypatch, server)
    src = DATASETS["mnist"]
    good = tuple(sources.Remote(r.filename, r.urls, _md5(server / r.filename)) for r in src.remotes)
    monkeypatch.setattr(src, "remotes", good)
    ds = load_split("mnist", "test")
    assert np.array_equal(ds.x[:, 0].numpy(), truth["t10k"][0])
    assert sorted(os.path.basename(u) for u in fetched) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    fetched.clear()
    assert len(load_split("mnist", "test")) == 3 and fetched == []  # found in the cache, no download


def test_download_with_wrong_md5_fails_and_leaves_nothing(tmp_path, monkeypatch):
    server = tmp_path / "server"
    write_mnist(server)
    _serve(monkeypatch, server)  # the real checksums of MNIST do not match these tiny files
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        load_split("mnist", "train")
    assert not (tmp_path / "xdg" / "activelab" / "mnist").exists()


def test_download_extracts_cifar_archive_into_root(tmp_path, monkeypatch):
    server = tmp_path / "server"
    write_cifar(tmp_path / "staging")
    server.mkdir()
    with tarfile.open(server / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    _serve(monkeypatch, server)
    src = DATASETS["cifar10"]
    (remote,) = src.remotes
    monkeypatch.setattr(
        src, "remotes", (sources.Remote(remote.filename, remote.urls, _md5(server / remote.filename), True),)
    )
    ds = load_split("cifar10", "train", root=str(tmp_path / "mine"))
    assert len(ds) == 10 and (tmp_path / "mine" / "cifar-10-batches-py" / "test_batch").exists()


def test_unknown_dataset_and_split():
    with pytest.raises(ActivelabError, match="known: digits"):
        load_split("mnist2", "train")
    with pytest.raises(ActivelabError, match="'train' or 'test'"):
        load_split("digits", "val")


def test_dataset_status(tmp_path):
    rows = {r["name"]: r for r in dataset_status()}
    assert set(rows) == {"digits", "mnist", "fashion_mnist", "svhn", "svhn_full", "cifar10", "imagenet"}
    for r in rows.values():
        assert set(r) == {"name", "available", "location", "note"}
    assert rows["digits"]["available"] and not rows["mnist"]["available"] and rows["mnist"]["location"] is None
    assert "train-images-idx3-ubyte.gz" in rows["mnist"]["note"]
    cache = tmp_path / "xdg" / "activelab" / "mnist"
    write_mnist(cache)
    write_svhn(tmp_path / "system" / "svhn", splits=("test",))
    rows = {r["name"]: r for r in dataset_status()}
    assert rows["mnist"]["available"] and rows["mnist"]["location"] == str(cache)
    assert not rows["svhn"]["available"] and "only the test split" in rows["svhn"]["note"]


def test_datasets_check_loads_available_datasets_and_flags_broken_files(tmp_path):
    """`activelab datasets --check` parses what `datasets` only finds: sizes for a good dataset, BROKEN and exit
    status 1 for files that are present but unreadable."""
    from click.testing import CliRunner

    from activelab.cli import main

    cache = tmp_path / "xdg" / "activelab" / "mnist"
    write_mnist(cache, n_train=7, n_test=3)
    result = CliRunner().invoke(main, ["datasets", "--check"])
    assert result.exit_code == 0, result.output
    line = next(row for row in result.output.splitlines() if row.startswith("mnist"))
    assert "yes" in line and "train 7 / test 3" in line
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    plain = CliRunner().invoke(main, ["datasets"])  # without --check the files are only found
    assert plain.exit_code == 0 and "BROKEN" not in plain.output
    result = CliRunner().invoke(main, ["datasets", "--check"])
    assert result.exit_code == 1
    line = next(row for row in result.output.splitlines() if row.startswith("mnist"))
    assert "BROKEN" in line


# --- real data ------------------------------------------------------------------------------------


def test_digits_real():
    from sklearn.datasets import load_digits

    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert (len(train), len(test)) == (1297, 500)
    assert train.x.shape == (1297, 1, 8, 8) and train.x.dtype == torch.uint8 and int(train.x.max()) == 255
    assert np.bincount(test.targets).tolist() == [50] * 10
    # together they are exactly the scikit-learn images, scaled 0..16 -> 0..255, each once
    ref = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    both = np.concatenate([train.x[:, 0].numpy(), test.x[:, 0].numpy()])
    assert sorted(r.tobytes() for r in both.reshape(len(both), -1)) == sorted(
        r.tobytes() for r in ref.reshape(len(ref), -1)
    )
    pixels = train.x.float() / 255
    assert train.mean.tolist() == pytest.approx([pixels.mean().item()], abs=1e-3)
    assert train.std.tolist() == pytest.approx([pixels.std().item()], abs=1e-3)
    again = load_split("digits", "test")
    assert torch.equal(again.x, test.x)


def test_fashion_mnist_from_system_path(monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DIRS", REAL_SYSTEM_DIRS)
    if sources.DATASETS["fashion_mnist"].locate("train") is None:
        pytest.skip("Fashion-MNIST is not installed in /usr/share/datasets")
    train = load_split("fashion_mnist", "train", download=False)
    test = load_split("fashion_mnist", "test", download=False)
    assert train.x.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert abs(train.x[:5000].float().mean().item() / 255 - 0.2860) < 0.01
