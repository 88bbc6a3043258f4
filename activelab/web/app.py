"""The labeling page's web application (FastAPI); :mod:`activelab.web.server` runs it with uvicorn.

Routes: ``/`` (the page), ``/static/*`` (its script and style), and a JSON API under ``/api``: ``state``
(the batch, counts, training status, learning curve), ``label`` and ``undo`` (one atomic database write
each), ``train`` (fit then query the next batch, in a background thread), ``query``, ``thumb/<id>`` (the
cached image of an indexed file) and ``file/<id>`` (the original file). Images are looked up by content id
in the project's index only, so no path from a request ever reaches the file system.

Security: with a token (always, when the server listens beyond the loopback interface), every request must
carry it (``?token=``, which also sets a cookie, the cookie, or an ``X-Activelab-Token`` header). On the
loopback interface requests whose ``Host`` is not a loopback name are refused (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
import traceback
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ActivelabError
from ..project.core import Project
from ..project.sources import array_to_image_bytes

STATIC = Path(__file__).parent / "static"
ID_PATTERN = re.compile(r"^[0-9a-f]{24}$")
TOKEN_COOKIE = "activelab_token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
#: keys of the classes, in order (s = skip, u = unsure, z = undo are reserved)
CLASS_KEYS = "1234567890qwertyiopadfghjklxcvbnm"


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    kind: str = "label"
    label: str | None = None
    who: str = Field("page", max_length=100)


class UndoIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    seq: int
    who: str = Field("page", max_length=100)


class TrainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: str = "margin"
    budget: int = Field(20, ge=1, le=10_000)
    train: bool = True
    validation_per_class: int | None = Field(None, ge=1, le=1000)
    epochs: int | None = Field(None, ge=1, le=10_000)


class Job:
    """One background job at a time (train, then query): its state for the page's progress display."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: dict[str, Any] = {"state": "idle"}
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, target, **state) -> bool:
        with self.lock:
            if self.running():
                return False
            self.state = {"state": "starting", "started": time.time(), **state}
            self.thread = threading.Thread(target=self._run, args=(target,), daemon=True, name="activelab-job")
            self.thread.start()
            return True

    def _run(self, target) -> None:
        try:
            target(self)
            self.update(state="done", finished=time.time())
        except ActivelabError as exc:
            self.update(state="error", message=str(exc), finished=time.time())
        except Exception as exc:  # noqa: BLE001 - shown on the page, and kept in the server log
            traceback.print_exc()
            self.update(state="error", message=f"{type(exc).__name__}: {exc}", finished=time.time())

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Ask a running job to stop and wait up to ``timeout`` seconds for it; True when none is left. A
        strategy waiting for labels on the page gives up at once (the round is not recorded); a training does
        not look at the request and, if it outlasts ``timeout``, ends with the process (its model file is
        written atomically, so nothing recorded is lost)."""
        self.stop.set()
        thread = self.thread
        if thread is not None:
            thread.join(timeout)
        return not self.running()

    def update(self, **values: Any) -> None:
        with self.lock:
            self.state = {**self.state, **values}

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.state)


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header.split("]")[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """ASGI middleware: the Host check on loopback, and the token on every request when there is one (a token
    given as ``?token=`` is also set as a cookie, so the page's own requests carry it)."""

    def __init__(self, app, token: str | None, loopback_only: bool) -> None:
        self.app, self.token, self.loopback_only = app, token, loopback_only

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback_only and _host_name(headers.get("host", "")) not in LOOPBACK_HOSTS:
            response = JSONResponse({"detail": "this server answers on its loopback address only"}, status_code=400)
            return await response(scope, receive, send)
        if self.token is None:
            return await self.app(scope, receive, send)
        from_query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        cookies = SimpleCookie(headers.get("cookie", ""))
        from_cookie = cookies[TOKEN_COOKIE].value if TOKEN_COOKIE in cookies else ""
        given = from_query or headers.get("x-activelab-token", "") or from_cookie
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            response = JSONResponse(
                {"detail": "a token is required: open the address the server printed (it ends in ?token=...)"},
                status_code=403,
            )
            return await response(scope, receive, send)
        if not from_query:
            return await self.app(scope, receive, send)
        cookie = f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode("latin-1")

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


def create_app(project: Project | str | Path, token: str | None = None, loopback_only: bool = True) -> FastAPI:
    """The app for one project. ``token``: required on every request when given. ``loopback_only``: refuse
    requests whose Host header is not a loopback name (set when the server listens on 127.0.0.1)."""
    if not isinstance(project, Project):
        project = Project(project)
    job = Job()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        # the server is stopping: end a job that waits on the page, in a worker thread (the join blocks)
        await asyncio.to_thread(job.shutdown)

    app = FastAPI(title="activelab labeling", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.project = project
    app.state.job = job

    app.add_middleware(Guard, token=token, loopback_only=loopback_only)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def file_row(file_id: str):
        if not ID_PATTERN.match(file_id):
            raise HTTPException(404, "no such file in this project")
        row = project.store.file(file_id)
        if row is None:
            raise HTTPException(404, "no such file in this project")
        return row

    @app.get("/api/state")
    def state() -> dict:
        from ..strategies.base import available_strategies

        status = project.status()
        rounds = project.store.rounds()
        current = rounds[-1] if rounds else None
        batch = project.batch(current["round"]) if current else []
        for item in batch:
            item["path"] = Path(item["path"]).name  # the page needs no full path
        fallbacks = [
            {"round": r["round"], "fallback": r["info"]["fallback"], "reason": r["info"].get("fallback_reason", "")}
            for r in rounds
            if r["info"].get("fallback")
        ]
        snapshot = job.snapshot()
        asked = []
        if snapshot.get("state") == "asking":
            asked_states = project.store.latest_labels(snapshot.get("asked", []))
            paths = project.store.paths_of(snapshot.get("asked", []))
            for rank, fid in enumerate(snapshot.get("asked", [])):
                state_ = asked_states.get(fid)
                asked.append(
                    {
                        "id": fid,
                        "path": Path(paths.get(fid, "")).name,
                        "rank": rank,
                        "score": None,
                        "guesses": [],
                        "kind": state_["kind"] if state_ is not None else None,
                        "label": state_["label"] if state_ is not None else None,
                        "seq": state_["seq"] if state_ is not None else None,
                    }
                )
        return {
            "project": project.folder.name,
            "asked": asked,
            "classes": project.classes,
            "keys": list(CLASS_KEYS[: len(project.classes)]),
            "round": current,
            "batch": batch,
            "status": status,
            "fallbacks": fallbacks,
            "job": snapshot,
            "strategies": available_strategies(),
        }

    @app.post("/api/label")
    def label(body: LabelIn) -> dict:
        file_row(body.id)
        if body.kind == "label" and body.label not in project.classes:
            raise HTTPException(422, f"unknown class {body.label!r}")
        try:
            (seq,) = project.store.add_labels(
                [(body.id, body.kind, body.label if body.kind == "label" else None)],
                who=body.who,
                source="page",
                round_=project.current_round(),
            )
        except ActivelabError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"id": body.id, "seq": seq, "kind": body.kind, "label": body.label if body.kind == "label" else None}

    @app.post("/api/undo")
    def undo(body: UndoIn) -> dict:
        file_row(body.id)
        seq, now = project.store.undo(body.id, body.seq, who=body.who, source="page")
        return {
            "id": body.id,
            "undone": seq is not None,
            "seq": now["seq"] if now is not None else None,
            "kind": now["kind"] if now is not None else None,
            "label": now["label"] if now is not None else None,
        }

    @app.get("/api/history/{file_id}")
    def history(file_id: str) -> list[dict]:
        file_row(file_id)
        return [dict(r) for r in project.store.history(file_id)]

    def page_oracle(j: Job):
        """The in-round oracle of strategies that ask in sub-batches: the page shows the asked images and this
        waits until each has a label (written through /api/label like any other)."""

        def ask(file_ids: list[str]) -> list[str]:
            j.update(state="asking", asked=list(file_ids), asked_round=(j.snapshot().get("asked_round") or 0) + 1)
            while True:
                current = project.store.latest_labels(file_ids)
                if all(f in current and current[f]["kind"] == "label" for f in file_ids):
                    break
                if j.stop.wait(0.2):
                    raise ActivelabError("the server stopped while the strategy was waiting for labels")
            j.update(state="querying", asked=[])
            return [current[f]["label"] for f in file_ids]

        return ask

    @app.post("/api/train")
    def train(body: TrainIn) -> dict:
        from ..strategies.base import get_strategy

        try:
            get_strategy(body.strategy)
        except ActivelabError as exc:
            raise HTTPException(422, str(exc)) from exc

        def work(j: Job) -> None:
            if body.train and body.validation_per_class is None:
                j.update(state="training", epoch=0)
                overrides = {"epochs": body.epochs} if body.epochs else {}
                record = project.fit(progress=lambda p: j.update(**p), **overrides)
                j.update(training={k: record[k] for k in ("train_size", "val_size", "val_accuracy")})
            j.update(state="querying")
            project.query(
                body.budget, body.strategy, validation_per_class=body.validation_per_class, oracle=page_oracle(j)
            )

        if not job.start(work, strategy=body.strategy, budget=body.budget):
            raise HTTPException(409, "a training or query is already running; wait for it")
        return job.snapshot()

    @app.get("/api/thumb/{file_id}")
    async def thumb(file_id: str) -> Response:
        # async: a database lookup and a small PNG encoding (about a millisecond) need no worker thread
        row = file_row(file_id)
        if row["row"] is None:
            raise HTTPException(404, "this file could not be decoded")
        image = np.asarray(project.pixels()[row["row"]])
        return Response(
            array_to_image_bytes(image), media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
        )

    @app.get("/api/file/{file_id}")
    def original(file_id: str) -> Response:
        row = file_row(file_id)
        path = Path(row["path"])
        if not path.is_file():  # an array row, or a file since moved: the cached image instead
            image = np.asarray(project.pixels()[row["row"]])
            return Response(array_to_image_bytes(image), media_type="image/png")
        return FileResponse(path)

    return app
