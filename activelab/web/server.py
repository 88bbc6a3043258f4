"""``activelab serve``: the labeling page of a project with uvicorn, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from pathlib import Path

from ..errors import ActivelabError


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_token(host: str, token: str | None) -> str | None:
    """The token the server will require: None on loopback unless one is given; on any other address the
    given one or a fresh random one. An empty token for a non-loopback address is refused."""
    if is_loopback(host):
        return token or None
    if token is not None and len(token) < 16:
        raise ActivelabError(
            f"listening on {host} makes the page reachable from other machines: it needs a token of at least 16 "
            "characters (leave --token out and the server makes one and prints it)"
        )
    return token or secrets.token_urlsafe(24)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def make_server(project_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765, token: str | None = None):
    """``(uvicorn.Server, url)`` for a project; ``server.run()`` serves until interrupted."""
    import uvicorn

    from .app import create_app

    token = bind_token(host, token)
    app = create_app(Path(project_dir), token=token, loopback_only=is_loopback(host))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    return uvicorn.Server(config), url


def serve(project_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Serve the labeling page until interrupted; prints the address (with the token when there is one)."""
    server, url = make_server(project_dir, host, port, token)
    print(f"activelab: labeling {Path(project_dir).resolve()} at {url}", flush=True)
    if not is_loopback(host):
        print("activelab: the page is reachable from other machines; only the address above (token) opens it")
    server.run()
