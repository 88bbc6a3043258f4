"""The labeling server: no path traversal, tokens beyond loopback, two clients at once, SIGKILL and restart."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from activelab.errors import ActivelabError  # noqa: E402
from activelab.project import Project  # noqa: E402
from activelab.project.demo import write_demo_images  # noqa: E402
from activelab.web.app import create_app  # noqa: E402
from activelab.web.server import bind_token, free_port, make_server  # noqa: E402


@pytest.fixture
def project(tmp_path) -> Project:
    images = write_demo_images(tmp_path / "images", per_class=2, unlabeled=40, size=12)
    p = Project.init(tmp_path / "proj", images=images, size=12, model="digits_cnn", train={"epochs": 1})
    p.query(20, "random")
    return p


def client(app, host="127.0.0.1:8765"):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's note about httpx versions
        from starlette.testclient import TestClient

    return TestClient(app, base_url=f"http://{host}")


def test_images_only_from_the_index(project, tmp_path):
    c = client(create_app(project))
    fid = project.batch()[0]["id"]
    r = c.get(f"/api/thumb/{fid}")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert c.get(f"/api/file/{fid}").content == Path(project.store.file(fid)["path"]).read_bytes()
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    for url in [
        "/api/file/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/file/../../../etc/passwd",
        f"/api/file/{'%2E%2E%2F' * 6}{secret.name}",
        "/api/thumb/" + "0" * 24,  # well formed, not in the index
        "/api/file/" + fid.upper(),
        "/static/../project.db",
        "/static/%2E%2E/%2E%2E/project/store.py",
        f"/api/file/{secret}",
    ]:
        r = c.get(url)
        assert r.status_code == 404, url
        assert b"do not serve" not in r.content and b"root:" not in r.content and b"SQLite" not in r.content
    assert c.post("/api/label", json={"id": "../../x", "kind": "label", "label": "circle"}).status_code == 404


def test_non_loopback_needs_a_token(project):
    assert bind_token("127.0.0.1", None) is None and bind_token("::1", None) is None
    made = bind_token("0.0.0.0", None)
    assert made and len(made) >= 16
    with pytest.raises(ActivelabError, match="needs a token"):
        bind_token("0.0.0.0", "short")
    with pytest.raises(ActivelabError, match="needs a token"):
        bind_token("192.168.1.5", "")
    _, url = make_server(project.folder, host="0.0.0.0", port=1)
    assert "?token=" in url and len(url.split("?token=")[1]) >= 16

    token = "t" * 32
    app = create_app(project, token=token, loopback_only=False)
    c = client(app, host="192.168.1.5:8765")
    assert c.get("/").status_code == 403
    assert c.get("/api/state").status_code == 403
    assert c.get("/api/state", headers={"x-activelab-token": "u" * 32}).status_code == 403
    assert c.get("/api/state", headers={"x-activelab-token": token}).status_code == 200
    r = c.get(f"/?token={token}")
    assert r.status_code == 200 and "activelab_token" in r.headers["set-cookie"]
    assert c.get("/api/state").status_code == 200  # the cookie now carries it
    # the CLI refuses a weak token beyond loopback
    from click.testing import CliRunner

    from activelab.cli import main

    r = CliRunner().invoke(main, ["serve", str(project.folder), "--host", "0.0.0.0", "--token", "abc"])
    assert r.exit_code == 2 and "needs a token" in r.output
    # on loopback, a request naming another host (DNS rebinding) is refused
    assert client(create_app(project), host="evil.example:8765").get("/api/state").status_code == 400


def _start_thread_server(folder):
    server, url = make_server(folder, port=free_port())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    return server, thread, url


def test_two_clients_labeling_the_same_items_lose_nothing(project):
    server, thread, url = _start_thread_server(project.folder)
    ids = [b["id"] for b in project.batch()]
    acks: dict[str, list] = {"a": [], "b": []}
    classes = project.classes

    def label_all(name, offset):
        with httpx.Client(base_url=url, timeout=30) as c:
            for i, fid in enumerate(ids):
                label = classes[(i + offset) % len(classes)]
                r = c.post("/api/label", json={"id": fid, "kind": "label", "label": label, "who": name})
                r.raise_for_status()
                acks[name].append((fid, r.json()["seq"], label))

    try:
        workers = [threading.Thread(target=label_all, args=(n, k)) for n, k in (("a", 0), ("b", 1))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert len(acks["a"]) == len(acks["b"]) == len(ids)
        # every write is in the history, with who wrote it; the latest (highest seq) is the state
        for fid in ids:
            history = project.store.history(fid)
            assert sorted(h["who"] for h in history) == ["a", "b"]
            assert project.labels()[fid] == history[-1]["label"]
        mine = {(fid, seq) for name in acks for fid, seq, _ in acks[name]}
        stored = {(h["file_id"], h["seq"]) for fid in ids for h in project.store.history(fid)}
        assert mine == stored
        # an undo of a write that the other tab has since overwritten does nothing
        with httpx.Client(base_url=url) as c:
            fid, seq_a, _ = acks["a"][0]
            seq_b = next(s for f, s, _ in acks["b"] if f == fid)
            older = min(seq_a, seq_b)
            assert c.post("/api/undo", json={"id": fid, "seq": older}).json()["undone"] is False
            state = c.get("/api/state").json()
            assert {b["id"]: b["label"] for b in state["batch"]} == {fid: project.labels()[fid] for fid in ids}
    finally:
        server.should_exit = True
        thread.join(10)


def _fork(target, *args):
    """A child process that starts at once (forked: torch is already imported) and can be SIGKILLed."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _serve(folder, port):
    server, _ = make_server(folder, port=port)
    server.run()


def _wait_up(url, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.is_alive(), "the server exited"
        try:
            if httpx.get(url + "api/state", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the server did not come up")


def test_sigkill_of_server_while_labeling_keeps_every_acknowledged_label(project):
    ids = [b["id"] for b in project.batch()]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = _fork(_serve, project.folder, port)
    acked: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def typist():
        with httpx.Client(base_url=url, timeout=5) as c:
            i = 0
            while not stop.is_set():
                fid = ids[i % len(ids)]
                label = project.classes[i % 3]
                try:
                    r = c.post("/api/label", json={"id": fid, "kind": "label", "label": label})
                except httpx.HTTPError:
                    return  # the server is gone: this label was being typed
                if r.status_code == 200:
                    acked.append((fid, r.json()["seq"], label))
                i += 1

    try:
        _wait_up(url, proc)
        t = threading.Thread(target=typist)
        t.start()
        deadline = time.time() + 30
        while len(acked) < 25 and time.time() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of a stream of writes
        proc.join(10)
        stop.set()
        t.join(10)
        assert len(acked) >= 25
        conn = sqlite3.connect(project.folder / "project.db")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        proc = _fork(_serve, project.folder, port)  # restart
        _wait_up(url, proc)
        reopened = Project(project.folder)
        rows = {r["seq"]: r for fid in ids for r in reopened.store.history(fid)}
        for fid, seq, label in acked:
            assert rows[seq]["file_id"] == fid and rows[seq]["label"] == label
        assert 0 <= len(rows) - len(acked) <= 1  # at most the label in flight (written, not acknowledged)
        r = httpx.post(url + "api/label", json={"id": ids[0], "kind": "skip"}, timeout=10)
        assert r.status_code == 200  # and labeling goes on
    finally:
        stop.set()
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)


def _query_forever(folder):
    p = Project(folder)  # its own database connection
    while True:
        p.fit()
        p.query(5, "margin")


def test_sigkill_of_a_query_leaves_the_project_whole(project):
    project.teach([b["id"] for b in project.batch()[:9]], project.classes * 3)
    before_labels, before_rounds = project.labels(), len(project.store.rounds())
    proc = _fork(_query_forever, project.folder)
    deadline = time.time() + 60
    while len(project.store.rounds()) < before_rounds + 2 and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(float(np.random.default_rng().uniform(0.0, 0.3)))  # somewhere in a fit, a query or a write
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    conn = sqlite3.connect(project.folder / "project.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    p = Project(project.folder)
    assert p.labels() == before_labels
    rounds = p.store.rounds()
    assert len(rounds) >= before_rounds + 2
    for r in rounds[before_rounds:]:  # every recorded round is whole
        assert len(p.store.picks(r["round"])) == r["budget"] == 5
    for t in p.store.trainings():  # and every recorded checkpoint loads
        assert p.load_model(t["checkpoint"]) is not None
    assert len(p.query(5, "random")) == 5


@pytest.fixture
def asking_strategy():
    """A strategy that asks for the labels of two of its picks during the selection (in-round oracle)."""
    from activelab.strategies import base

    class Asks(base.Strategy):
        name = "_asks_two"
        uses_oracle = True

        def query(self, ctx, budget, rng):
            first = np.arange(2)
            labels = ctx.ask(first)
            ctx.info["answers"] = [int(v) for v in labels]
            return np.arange(budget)

    base._REGISTRY[Asks.name] = Asks
    yield Asks.name
    del base._REGISTRY[Asks.name]


def test_sub_batches_asked_during_the_selection_are_labeled_on_the_page(project, asking_strategy):
    project.teach([b["id"] for b in project.batch()[:6]], project.classes * 2)
    project.fit()
    with pytest.raises(ActivelabError, match="asks for labels of its own picks"):
        project.query(4, asking_strategy)
    # the notebook: an oracle function answers with class names; the answers are stored as labels
    picks = project.query(4, asking_strategy, oracle=lambda fids: ["square"] * len(fids))
    asked = [b["id"] for b in picks[:2]]
    assert all(project.store.history(f)[-1]["who"] == "oracle" for f in asked)
    assert project.store.rounds()[-1]["info"]["answers"] == [1, 1]
    # a real sub-batch strategy: GALAXY asks one image at a time
    answered = []
    project.query(4, "galaxy", oracle=lambda fids: answered.extend(fids) or ["circle"] * len(fids))
    info = project.store.rounds()[-1]["info"]
    assert info["oracle_calls"] >= 1 and info["oracle_asked"] == len(answered) > 0
    assert all(project.labels()[f] == "circle" for f in answered)
    # the page: the job shows the asked images and waits for their labels
    server, thread, url = _start_thread_server(project.folder)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            r = c.post("/api/train", json={"strategy": asking_strategy, "budget": 4, "train": False})
            assert r.status_code == 200
            deadline = time.time() + 30
            state = c.get("/api/state").json()
            while state["job"]["state"] != "asking" and time.time() < deadline:
                time.sleep(0.1)
                state = c.get("/api/state").json()
            ids = [a["id"] for a in state["asked"]]
            assert len(ids) == 2 and state["job"]["asked"] == ids
            for fid, label in zip(ids, ["triangle", "circle"]):
                c.post("/api/label", json={"id": fid, "kind": "label", "label": label}).raise_for_status()
            while True:
                rr = c.get("/api/state")
                assert rr.status_code == 200, rr.text
                if rr.json()["job"]["state"] == "done" or time.time() > deadline:
                    break
                time.sleep(0.1)
            final = c.get("/api/state").json()
        assert final["job"]["state"] == "done", final["job"]
        rnd = final["round"]
        assert rnd["strategy"] == asking_strategy and rnd["info"]["answers"] == [2, 0]
        assert rnd["info"]["oracle_calls"] == 1 and [b["id"] for b in final["batch"][:2]] == ids
        assert project.labels()[ids[0]] == "triangle" and project.store.history(ids[0])[-1]["who"] == "page"
    finally:
        server.should_exit = True
        thread.join(10)


def test_stopping_the_server_ends_a_job_that_waits_for_labels_on_the_page(project, asking_strategy):
    project.teach([b["id"] for b in project.batch()[:6]], project.classes * 2)
    project.fit()
    rounds = len(project.store.rounds())
    server, thread, url = _start_thread_server(project.folder)
    job = server.config.app.state.job
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            c.post("/api/train", json={"strategy": asking_strategy, "budget": 4, "train": False}).raise_for_status()
            deadline = time.time() + 30
            while c.get("/api/state").json()["job"]["state"] != "asking" and time.time() < deadline:
                time.sleep(0.1)
        assert job.snapshot()["state"] == "asking" and job.running()
    finally:
        server.should_exit = True
        thread.join(20)
    assert not thread.is_alive()
    # the waiting strategy gave up when the server stopped: its thread is gone, nothing half-recorded
    assert not job.running()
    assert job.snapshot()["state"] == "error" and "server stopped" in job.snapshot()["message"]
    assert len(project.store.rounds()) == rounds
