"""The whole labeling loop in a real browser: Debian's chromium driven by Playwright, against a server this
test starts on a loopback port. Skipped (with the reason) when chromium or Playwright is missing; no browser
is ever downloaded."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("ACTIVELAB_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "labeling_page.png"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM} (apt-get install chromium)"
)


@pytest.fixture
def served(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from activelab.project import Project
    from activelab.project.demo import write_demo_images
    from activelab.web.server import free_port, make_server

    images = write_demo_images(tmp_path / "images", per_class=3, unlabeled=45, size=24)
    Project.init(tmp_path / "proj", images=images, size=24, train={"epochs": 2, "batch_size": 16}, validation_share=0.3)
    port = free_port()
    server, url = make_server(tmp_path / "proj", port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield url, tmp_path / "proj"
    server.should_exit = True
    thread.join(10)


def test_label_a_batch_by_keyboard_undo_train_and_next_batch(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from activelab.project import Project

    url, folder = served
    project = Project(folder)
    project.query(6, "margin")  # the first batch: random (no model yet)
    first = [b["id"] for b in project.batch()]

    profile = tempfile.mkdtemp(prefix="activelab-chromium-")
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=LAUNCH_ARGS,
                viewport={"width": 1200, "height": 760},
            )
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(url)
            page.wait_for_selector(".card")
            assert page.locator(".card").count() == 6
            assert "random picks" in page.inner_text("#notes")  # no model yet: reported
            classes = project.classes
            keys = page.locator("#keys kbd").all_inner_texts()
            assert keys[: len(classes)] == ["1", "2", "3"]
            # label the batch by keyboard: class keys 1..3, one skip, then undo the last one and relabel it
            typed = ["1", "2", "3", "s", "1", "2"]
            for n, k in enumerate(typed, start=1):
                page.keyboard.press(k)
                page.wait_for_function("n => document.querySelectorAll('.card .state:not(:empty)').length >= n", arg=n)
            page.wait_for_function("() => document.querySelectorAll('.card .state:not(:empty)').length === 6")
            page.keyboard.press("z")  # undo the last label (card 6)
            page.wait_for_function("() => document.querySelectorAll('.card .state:not(:empty)').length === 5")
            page.keyboard.press("3")  # relabel card 6 as class 3
            page.wait_for_function("() => document.querySelectorAll('.card .state:not(:empty)').length === 6")
            assert "batch 6 / 6" in page.inner_text("#progress-text")

            # what the database holds: the latest state per image, and the undone label still in the history
            latest = project.store.latest_labels()
            want = {first[0]: classes[0], first[1]: classes[1], first[2]: classes[2], first[4]: classes[0]}
            want[first[5]] = classes[2]
            for fid, label in want.items():
                assert latest[fid]["kind"] == "label" and latest[fid]["label"] == label
            assert latest[first[3]]["kind"] == "skip"
            kinds = [(h["kind"], h["label"]) for h in project.store.history(first[5])]
            assert kinds == [("label", classes[1]), ("label", classes[1]), ("label", classes[2])] or kinds == [
                ("label", classes[1]),
                ("clear", None),
                ("label", classes[2]),
            ]

            # train and query the next batch from the page
            page.fill("#budget", "8")
            page.click("#train")
            page.wait_for_function(
                "() => document.getElementById('round-info').textContent.startsWith('Round 2')", timeout=120_000
            )
            page.wait_for_selector(".card")
            assert page.locator(".card").count() == 8
            second = [b["id"] for b in project.batch()]
            assert not set(second) & set(first)  # labeled and skipped images are not offered again
            page.wait_for_function("() => document.querySelector('#curve circle') !== null")
            guess = page.locator(".card .guess").first.inner_text()
            assert "%" in guess  # the model's top guesses are shown
            assert "Held-out set" in page.inner_text("#validation-info")
            for k in ["2", "1", "3", "1"]:
                page.keyboard.press(k)
            page.wait_for_function("() => document.querySelectorAll('.card .state:not(:empty)').length === 4")
            # a second tab labels the next image; the first tab shows it without a reload, and both writes stay
            other = browser.new_page()
            other.goto(url)
            other.wait_for_function("() => document.querySelectorAll('.card .state:not(:empty)').length === 4")
            other.keyboard.press("2")
            other.wait_for_function("() => document.querySelectorAll('.card .state:not(:empty)').length === 5")
            page.wait_for_function(
                "() => document.querySelectorAll('.card .state:not(:empty)').length === 5", timeout=10_000
            )
            assert project.labels()[second[4]] == classes[1]
            page.keyboard.press("3")  # the first tab's cursor moved on: it labels the sixth image
            page.wait_for_function("() => document.querySelectorAll('.card .state:not(:empty)').length === 6")
            assert project.labels()[second[5]] == classes[2] and project.labels()[second[4]] == classes[1]
            other.close()
            # the README's picture: rewritten when missing or with ACTIVELAB_UPDATE_SCREENSHOT=1 (not on every
            # run, so that running the tests leaves the working tree clean)
            shot = SCREENSHOT if os.environ.get("ACTIVELAB_UPDATE_SCREENSHOT") or not SCREENSHOT.exists() else None
            shot = shot or tmp_path / "labeling_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)

    # and from an export
    out = tmp_path / "labels.csv"
    project.export(out)
    with open(out) as f:
        rows = {Path(r["path"]).name: r["label"] for r in csv.DictReader(f)}
    files = {r["id"]: Path(r["path"]).name for r in project.store.files()}
    for fid, label in want.items():
        assert rows[files[fid]] == label
    assert files[first[3]] not in rows  # skipped: not a label
    assert sum(1 for fid in second[:6] if files[fid] in rows) == 6
