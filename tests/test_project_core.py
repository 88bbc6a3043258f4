"""Labeling projects: stable content ids, indexing once, label history, training and queries, validation
rounds, fallback reports, export / import with conflicts, the notebook object and the CLI."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from activelab.errors import ActivelabError
from activelab.project import Project
from activelab.project import sources as S
from activelab.project.demo import write_demo_images
from activelab.project.querying import StrategyFallbackWarning

TRAIN = {"epochs": 1, "batch_size": 16}


def tiny_factory(num_classes: int) -> nn.Module:
    """A user model for ``module:factory`` (12-pixel RGB images)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 16), nn.ReLU(), nn.Linear(16, num_classes))


@pytest.fixture
def images(tmp_path):
    return write_demo_images(tmp_path / "images", per_class=4, unlabeled=36, size=12)


def make(tmp_path, images, **kw) -> Project:
    kw = {"size": 12, "model": "digits_cnn", "train": TRAIN, **kw}
    return Project.init(tmp_path / "proj", images=images, **kw)


def test_ids_are_file_identities_and_stay_stable_when_files_change(tmp_path, images):
    p = make(tmp_path, images)
    assert p.status()["files"] == 48 and p.status()["per_class"] == {"circle": 4, "square": 4, "triangle": 4}
    ids_before = {r["path"]: r["id"] for r in p.store.files()}
    batch = p.query(5, "random")
    picked = [(b["id"], b["path"]) for b in batch]
    p.teach([picked[0][0]], ["square"])
    # add files whose names sort first (positions of every old file shift), a copy and a move
    S_png = images / "img_0001.png"
    shutil.copy(S_png, images / "aaa_copy_of_0001.png")
    write_demo_images(tmp_path / "more", per_class=0, unlabeled=5, size=12, seed=7)
    for f in sorted((tmp_path / "more").glob("*.png")):
        shutil.copy(f, images / f"_{f.name}")
    moved_from = images / picked[0][1].split("/")[-1]
    moved_to = images / "renamed.png"
    moved_from.rename(moved_to)
    counts = p.index()
    assert counts["new"] == 5 and counts["duplicates"] == 2  # the copy and the moved file: known content
    ids_after = {r["path"]: r["id"] for r in p.store.files()}
    for path, fid in ids_before.items():
        assert fid in ids_after.values()  # every old id is still there ...
        if path in ids_after:
            assert ids_after[path] == fid  # ... for the same file
    # the round's picks are still the same files, and the moved file keeps its label (by content)
    assert [(b["id"]) for b in p.batch(1)] == [i for i, _ in picked]
    assert p.labels()[picked[0][0]] == "square"
    assert p.resolve([moved_to]) == [picked[0][0]]
    assert p.resolve([images / "aaa_copy_of_0001.png"]) == p.resolve([S_png])
    with pytest.raises(ActivelabError, match="neither a file id"):
        p.resolve(["nope.png"])


def test_index_decodes_each_file_once_and_rereads_nothing(tmp_path, images, monkeypatch):
    calls = []
    original = S.ImageTransform.apply
    monkeypatch.setattr(S.ImageTransform, "apply", lambda self, data: calls.append(1) or original(self, data))
    (images / "corrupt.png").write_bytes(b"not a png")
    with pytest.warns(S.CorruptFilesWarning, match="corrupt.png"):
        p = make(tmp_path, images)
    assert len(calls) == 49 and p.status()["corrupt"] == 1 and p.status()["files"] == 48
    calls.clear()
    assert p.index()["known"] == 49 and calls == []
    # the cache holds each decoded image at its row: same as decoding the file again
    row = p.store.files()[7]
    fresh = original(p.transform, open(row["path"], "rb").read())
    assert np.array_equal(np.asarray(p.pixels()[row["row"]]), fresh)


def test_label_history_latest_wins_and_undo(tmp_path, images):
    p = make(tmp_path, images)
    fid = p.query(3, "random")[0]["id"]
    (s1,) = p.teach([fid], ["circle"], who="ann")
    (s2,) = p.teach([fid], ["triangle"], who="bob")
    assert p.labels()[fid] == "triangle"
    assert [(h["label"], h["who"]) for h in p.store.history(fid)] == [("circle", "ann"), ("triangle", "bob")]
    assert p.store.undo(fid, s1, "ann", "test")[0] is None  # stale: bob wrote since; nothing changes
    seq, now = p.store.undo(fid, s2, "bob", "test")
    assert seq is not None and now["label"] == "circle" and p.labels()[fid] == "circle"
    p.teach([fid], [None])
    assert fid not in p.labels() and p.status()["skipped"] == 1
    with pytest.raises(ActivelabError, match="unknown class 'cat'"):
        p.teach([fid], ["cat"])
    assert len(p.store.history(fid)) == 4  # nothing was ever deleted


def test_train_query_validation_round_and_fk(tmp_path, images):
    p = make(tmp_path, images, validation_share=0.25)
    first = p.query(6, "margin")  # no model yet: random, reported
    assert p.store.rounds()[-1]["info"]["fallback"] == "random" and first[0]["guesses"] == []
    p.teach([b["id"] for b in first], ["circle", "square", "triangle"] * 2)
    seen = []
    record = p.fit(progress=seen.append)
    train, val = p.labeled_split()
    assert record["train_size"] == len(train) and record["val_size"] == len(val) and len(train) + len(val) == 18
    assert seen and seen[-1]["epoch"] == 1 and seen[-1]["epochs"] == 1
    batch = p.query(5, "margin")
    labeled = set(p.labels())
    assert not labeled & {b["id"] for b in batch}
    assert all(len(b["guesses"]) == 3 and abs(sum(g[1] for g in b["guesses"]) - 1) < 1e-3 for b in batch)
    assert all(b["score"] is not None for b in batch)
    # held-out share: fixed by content hash, never trained on
    assert all(p.is_validation(fid) for fid, _, _ in val) and not any(p.is_validation(fid) for fid, _, _ in train)
    # label-k-per-class round: k per class by guesses plus a random sample
    vbatch = p.query(0, validation_per_class=2)
    rnd = p.store.rounds()[-1]
    assert rnd["kind"] == "validation" and len(vbatch) == 6 and "fk" in rnd["info"]["purpose"]
    p.teach([b["id"] for b in vbatch], ["circle", "square", "triangle"] * 2)
    _, val2 = p.labeled_split()
    assert {b["id"] for b in vbatch} <= {fid for fid, _, _ in val2}
    p.fit()
    fk = p.query(4, "fk")
    assert len(fk) == 4 and p.store.rounds()[-1]["strategy"] == "fk"


def test_fk_without_validation_says_what_to_do(tmp_path, images):
    p = make(tmp_path, images, validation_share=0.0)
    p.fit()
    with pytest.raises(ActivelabError, match="--validation-per-class"):
        p.query(3, "fk")


def test_strategy_fallback_is_reported(tmp_path, images):
    from activelab.strategies import base

    class FallsBack(base.Strategy):
        name = "_falls_back"
        Params = base.Strategy.Params

        def query(self, ctx, budget, rng):
            ctx.info["fallback"] = "random"
            ctx.info["fallback_reason"] = "no validation sample is misclassified"
            return rng.choice(len(ctx.candidates), size=budget, replace=False)

    p = make(tmp_path, images)
    p.fit()
    base._REGISTRY["_falls_back"] = FallsBack
    try:
        with pytest.warns(StrategyFallbackWarning, match="misclassified"):
            p.query(3, "_falls_back")
    finally:
        del base._REGISTRY["_falls_back"]
    info = p.store.rounds()[-1]["info"]
    assert info["fallback"] == "random" and "misclassified" in info["fallback_reason"]
    assert "fell back to random" in p.report()


def test_export_and_import_merge_with_conflicts(tmp_path, images):
    p = make(tmp_path, images)
    batch = p.query(4, "random")
    p.teach([b["id"] for b in batch], ["circle", "square", "triangle", "circle"])
    labels = p.labels()
    out_csv, out_json, tree = p.export(tmp_path / "l.csv"), p.export(tmp_path / "l.json"), p.export(tmp_path / "tree")
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(labels) == 16
    doc = json.loads(out_json.read_text())
    assert {r["id"]: r["label"] for r in doc["labels"]} == labels and doc["classes"] == p.classes
    assert all(r["history"] for r in doc["labels"])
    assert sum(len(list((tree / c).iterdir())) for c in p.classes) == 16

    # a second project over the same pictures, unlabeled: imports merge
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(images.rglob("*.png")):
        shutil.copy(path, flat / f"{path.parent.name}_{path.name}")
    q = Project.init(tmp_path / "proj2", images=flat, classes=p.classes, size=12, model="digits_cnn", train=TRAIN)
    assert q.status()["labeled"] == 0
    report = q.import_labels(out_csv)
    assert report["added"] == 16 and report["conflicts"] == [] and q.labels() == labels
    # change one label in the CSV: a conflict, reported, not written
    rows[0]["label"] = next(c for c in p.classes if c != rows[0]["label"])
    with open(tmp_path / "changed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label"])
        w.writeheader()
        w.writerows(rows)
    report = q.import_labels(tmp_path / "changed.csv")
    assert report["added"] == 0 and report["unchanged"] == 15 and len(report["conflicts"]) == 1
    conflict = report["conflicts"][0]
    assert q.labels()[conflict["id"]] == conflict["ours"] != conflict["theirs"] == rows[0]["label"]
    assert q.import_labels(tmp_path / "changed.csv", overwrite=True)["added"] == 1
    assert q.labels()[conflict["id"]] == rows[0]["label"]
    assert q.import_labels(out_json)["conflicts"]  # JSON by id: the first label is back in conflict
    assert q.import_labels(tree)["unchanged"] == 15


def test_user_model_factory_and_arrays_project(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (30, 12, 12, 3), dtype=np.uint8)
    y = np.array(["a", "b", ""] * 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    p = Project.init(
        tmp_path / "proj", arrays=tmp_path / "d.npz", size=12, model=f"{__name__}:tiny_factory", train=TRAIN
    )
    assert p.classes == ["a", "b"] and p.status()["labeled"] == 20 and p.status()["files"] == 30
    torch.manual_seed(0)
    assert isinstance(p.build_model(), nn.Sequential)
    p.fit()
    assert len(p.query(3, "entropy")) == 3
    with pytest.raises(ActivelabError, match="cannot import .nowhere."):
        Project.init(tmp_path / "p2", arrays=tmp_path / "d.npz", model="nowhere:missing").fit()


def test_cli_project_commands(tmp_path, images):
    from activelab.cli import main

    run = CliRunner().invoke
    proj = str(tmp_path / "proj")
    r = run(
        main,
        ["project", "init", proj, "--images", str(images), "--size", "12", "--model", "digits_cnn", "--epochs", "1"],
    )
    assert r.exit_code == 0, r.output
    assert "48 images" in r.output and "circle" in r.output
    r = run(main, ["project", "query", proj, "--strategy", "margin", "--budget", "4"])
    assert r.exit_code == 0 and "round 1 (random): 4 images" in r.output and "fell back to random" in r.output
    r = run(main, ["project", "query", proj, "--train", "--strategy", "entropy", "--budget", "3"])
    assert r.exit_code == 0 and "round 2 (entropy): 3 images" in r.output, r.output
    r = run(main, ["project", "status", proj, "--json"])
    assert json.loads(r.output)["rounds"] == 2
    r = run(main, ["project", "export", proj, "--out", str(tmp_path / "x.csv")])
    assert r.exit_code == 0 and (tmp_path / "x.csv").is_file()
    r = run(main, ["project", "import", proj, str(tmp_path / "x.csv")])
    assert r.exit_code == 0 and "unchanged 12, conflicts 0" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{images}/img_0001.png,hexagon\n")
    r = run(main, ["project", "import", proj, str(bad)])
    assert r.exit_code == 2 and "unknown class 'hexagon'" in r.output
    r = run(main, ["project", "init", proj, "--images", str(images)])
    assert r.exit_code == 2 and "already holds a project" in r.output


def test_index_after_a_kill_mid_append_cuts_the_torn_tail(tmp_path, images):
    p = make(tmp_path, images)
    with open(p.pixels_path, "ab") as f:  # a kill during an append: part of a record, no database row
        f.write(b"\x01" * (p.transform.nbytes // 2))
    write_demo_images(tmp_path / "more", per_class=0, unlabeled=3, size=12, seed=5)
    for f in sorted((tmp_path / "more").glob("*.png")):
        shutil.copy(f, images / f"new_{f.name}")
    assert p.index()["new"] == 3
    assert p.pixels_path.stat().st_size % p.transform.nbytes == 0
    for row in p.store.files():
        fresh = S.ImageTransform.apply(p.transform, open(row["path"], "rb").read())
        assert np.array_equal(np.asarray(p.pixels()[row["row"]]), fresh), row["path"]


def test_class_folders_must_be_classes(tmp_path, images):
    with pytest.raises(ActivelabError, match=r"sub-folders \['triangle'\] that are not classes"):
        Project.init(tmp_path / "p", images=images, classes=["circle", "square"])
    assert not (tmp_path / "p" / "project.db").exists()


def test_a_project_inside_its_images_folder_is_not_indexed(tmp_path, images):
    p = Project.init(images / "proj", images=images, size=12, model="digits_cnn", train=TRAIN)
    p.export(images / "proj" / "tree")  # pictures inside the project folder
    assert p.index()["new"] == 0 and p.status()["files"] == 48
