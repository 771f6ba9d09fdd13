"""`tunesmith webui`: configure, launch, watch, chat and export in the browser (Gradio).

The page works offline: Gradio's usage reporting and update check are turned off, and its
assets (fonts included) are served by the local server. It is confined to a workspace root
(workspace.py); off loopback it requires a login, and it answers only requests addressed to it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

AUTH_ENV = "TUNESMITH_WEBUI_AUTH"
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: only 'localhost' is known to stay on this machine
        return False


def parse_auth(text: str | None, source: str) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError(f"{source}: expected USER:PASSWORD (both non-empty).")
    return user, password


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """Host header values this server answers: its bound address and the local names, with the port.
    None (any) for a wildcard bind, where the login guards the page and the machine's names are many."""
    bare = host.strip("[]")
    if bare in ("0.0.0.0", "::"):
        return None
    names = {f"[{bare}]" if ":" in bare else bare, *LOCAL_NAMES} if is_loopback(host) else \
        {f"[{bare}]" if ":" in bare else bare}
    names = {n.lower() for n in names}
    return {f"{n}:{port}" for n in names} | ({*names} if port == 80 else set())


class HostCheck:
    """ASGI middleware refusing requests whose Host header names another site (DNS rebinding)."""

    def __init__(self, app: Any, allowed: set[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
            if host not in self.allowed:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b"refused: the Host header does not name this server (DNS rebinding protection).\n"
                await send({"type": "http.response.start", "status": 421,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def launch(host: str = "127.0.0.1", port: int = 7860, root: str | Path | None = None,
           auth: str | None = None) -> None:
    """Serve the page until interrupted. Binds 127.0.0.1 unless told otherwise; any other address
    needs a login (--auth or TUNESMITH_WEBUI_AUTH)."""
    login = parse_auth(auth, "--auth") if auth else parse_auth(os.environ.get(AUTH_ENV), AUTH_ENV)
    if not is_loopback(host) and login is None:
        raise UserError(f"refusing to serve the web UI on {host} without a login: anyone who can reach it could "
                        "read and write files and run training.",
                        hint=f"pass --auth USER:PASSWORD (or set {AUTH_ENV}), or bind 127.0.0.1.")
    from tunesmith.ui.workspace import Workspace

    workspace = Workspace(root)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio when imported: no phoning home
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("the web UI needs Gradio, which is not installed.",
                        hint="pip install 'tunesmith[webui]'") from None
    from starlette.middleware import Middleware

    from tunesmith.ui.app import CSS, WebUI, build_app, cleanup

    os.chdir(workspace.root)  # relative paths in the page, and in the runs it starts, mean the root
    ui = WebUI(root=workspace.root)
    app = build_app(ui)
    app.queue(default_concurrency_limit=4)
    hosts = allowed_hosts(host, port)
    middleware = [Middleware(HostCheck, allowed=hosts)] if hosts is not None else []
    print(f"Workspace root: {workspace.root} (the page reads and writes only inside it).", flush=True)
    try:
        app.launch(server_name=host, server_port=port, css=CSS, ssr_mode=False, show_error=True,
                   footer_links=[], quiet=False, auth=login, app_kwargs={"middleware": middleware})
    finally:
        cleanup(ui)
