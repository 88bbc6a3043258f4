"""Sources for a user's own data: folders, CSVs, arrays; corrupt files; unknown classes; config dataset kinds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from activelab.data.sources import load_split
from activelab.errors import ActivelabError
from activelab.project import sources as S


def _png(path, size=(10, 14), mode="RGB", value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.full((size[1], size[0], channels), value, dtype=np.uint8).squeeze(-1 if channels == 1 else ())
    if mode == "RGBA":
        arr[..., 3] = 0  # fully transparent
    Image.fromarray(arr, mode=mode).save(path)
    return path


def test_transform_handles_sizes_and_modes_and_keeps_aspect():
    import io

    def encode(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    t = S.ImageTransform(size=8, mode="RGB", fit="pad")
    wide = Image.new("RGB", (16, 8), (255, 0, 0))
    out = t.apply(encode(wide))
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8
    # aspect kept: the red band is 4 rows in the middle, black padding above and below
    assert (out[0, 2:6] == 255).all() and (out[:, :2] == 0).all() and (out[:, 6:] == 0).all()
    gray = S.ImageTransform(size=8, mode="L").apply(encode(Image.new("L", (5, 9), 77)))
    assert gray.shape == (1, 8, 8) and gray.max() == 77
    # a fully transparent RGBA image is composited on white, not black
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (S.ImageTransform(size=8, fit="stretch").apply(encode(transparent)) == 255).all()
    with pytest.raises(ActivelabError, match="mode"):
        S.ImageTransform(mode="CMYK")
    with pytest.raises(ActivelabError, match="size"):
        S.ImageTransform(size=1)


def test_scan_folder_flat_and_per_class_without_decoding(tmp_path, monkeypatch):
    _png(tmp_path / "a.png")
    _png(tmp_path / "boot" / "b.jpg".replace(".jpg", ".png"))
    _png(tmp_path / "boot" / "deeper" / "c.png")
    _png(tmp_path / "sandal" / "d.png")
    (tmp_path / "notes.txt").write_text("not an image")
    _png(tmp_path / ".hidden" / "e.png")

    def boom(*a, **k):
        raise AssertionError("an image was decoded to read labels")

    monkeypatch.setattr(S.ImageTransform, "apply", boom)
    monkeypatch.setattr(Image, "open", boom)
    assert S.scan_folder(tmp_path) == [
        ("a.png", None),
        ("boot/b.png", "boot"),
        ("boot/deeper/c.png", "boot"),
        ("sandal/d.png", "sandal"),
    ]


def test_csv_labels_unlabeled_rows_and_unknown_class(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("path,label\nx/1.png,boot\nx/2.png,\n/abs/3.png,sandal\n")
    rows, classes = S.read_label_csv(f)
    assert rows == [("x/1.png", "boot"), ("x/2.png", None), ("/abs/3.png", "sandal")]
    assert classes == ["boot", "sandal"]
    assert S.resolve_csv_path(f, "x/1.png") == tmp_path / "x" / "1.png"
    rows, classes = S.read_label_csv(f, ["sandal", "boot", "sneaker"])
    assert classes == ["sandal", "boot", "sneaker"]
    with pytest.raises(ActivelabError, match=r"line 4: unknown class 'sandal'.*boot, sneaker"):
        S.read_label_csv(f, ["boot", "sneaker"])
    bad = tmp_path / "bad.csv"
    bad.write_text("a.png,boot,extra\n")
    with pytest.raises(ActivelabError, match="2 columns"):
        S.read_label_csv(bad)


def test_corrupt_file_is_skipped_with_a_warning(tmp_path):
    good = [_png(tmp_path / f"{i}.png", value=10 * i) for i in range(3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:40])
    files = [(p, None) for p in [*good, broken, truncated]]
    with pytest.warns(S.CorruptFilesWarning, match=r"skipped 2 unreadable image\(s\).*broken\.png.*cut\.png"):
        data, kept, bad = S.images_dataset(files, ["a", "b"], S.ImageTransform(size=6))
    assert kept == good and [p for p, _ in bad] == [str(broken), str(truncated)]
    assert data.x.shape == (3, 3, 6, 6) and (data.y == -1).all()
    assert data.x[2].max() == 20  # the right image in the right place


def test_arrays_npz_with_names_and_npy_images_only(tmp_path):
    x = np.arange(4 * 5 * 5 * 3, dtype=np.uint8).reshape(4, 5, 5, 3)  # NHWC
    np.savez(tmp_path / "d.npz", x=x, y=np.array(["cat", "", "dog", "cat"]))
    d = S.load_arrays(tmp_path / "d.npz")
    assert d.classes == ["cat", "dog"] and d.y.tolist() == [0, -1, 1, 0]
    assert d.x.shape == (4, 3, 5, 5) and int(d.x[1, 2, 0, 0]) == int(x[1, 0, 0, 2])
    np.save(tmp_path / "f.npy", np.full((2, 4, 4), 0.5, dtype=np.float32))
    f = S.load_arrays(tmp_path / "f.npy")
    assert f.x.dtype.is_floating_point is False and int(f.x.max()) == 128 and (f.y == -1).all()
    np.savez(tmp_path / "bad.npz", x=x, y=np.array(["cat", "owl", "dog", "cat"]))
    with pytest.raises(ActivelabError, match="unknown class"):
        S.load_arrays(tmp_path / "bad.npz", ["cat", "dog"])


def test_dataset_kinds_in_experiment_configs(tmp_path):
    root = tmp_path / "data"
    for c, v in [("ant", 30), ("bee", 200)]:
        for i in range(10):
            _png(root / c / f"{c}{i}.png", size=(7 + i, 9), value=v)
    (root / "activelab-source.yaml").write_text("size: 8\nmode: L\n")
    train, test = (
        load_split("image_folder", "train", root=str(root)),
        load_split("image_folder", "test", root=str(root)),
    )
    assert train.classes == test.classes == ["ant", "bee"]
    assert len(train) + len(test) == 20 and len(test) > 0 and train.x.shape[1:] == (1, 8, 8)
    # the split is by file name: the same on every call
    assert len(load_split("image_folder", "test", root=str(root))) == len(test)
    # image_csv over the same files
    lines = ["path,label"] + [f"{c}/{c}{i}.png,{c}" for c in ("ant", "bee") for i in range(10)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    csv_train = load_split("image_csv", "train", root=str(root))
    assert len(csv_train) == len(train) and csv_train.targets.tolist() == train.targets.tolist()
    # arrays
    (tmp_path / "arr").mkdir()
    np.savez(tmp_path / "arr" / "train.npz", x=train.x.numpy(), y=train.targets)
    np.savez(tmp_path / "arr" / "test.npz", x=test.x.numpy(), y=test.targets)
    assert len(load_split("arrays", "test", root=str(tmp_path / "arr"))) == len(test)
    with pytest.raises(ActivelabError, match="set dataset.root"):
        load_split("image_folder", "train")
    (root / "loose.png").write_bytes(_png(tmp_path / "x.png").read_bytes())
    with pytest.raises(ActivelabError, match="no label"):
        for split in ("train", "test"):
            load_split("image_folder", split, root=str(root))
