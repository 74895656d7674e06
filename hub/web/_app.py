"""The hub's HTTP app (Starlette): /metrics, /healthz, the REST API, the console's config and its static files."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.control import split_host
from hub.web._rest import RestApi

__all__ = ["CONSOLE_DIR", "CONTENT_SECURITY_POLICY", "Page", "web_app"]

log = logging.getLogger("hub.web")

#: A blocking page (/metrics, /healthz): returns status, content type and body; runs in a worker thread.
Page = Callable[[], "tuple[int, str, bytes]"]

#: The console's static files, shipped in the package.
CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

#: The console may load only its own files and talk only to its own origin and WebSocket URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)

_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+")


def _page(page: Page, name: str) -> Route:
    async def endpoint(request: Request) -> Response:
        try:
            status, content_type, body = await trio.to_thread.run_sync(page)
        except Exception:  # a failing figure must not take the listener down
            log.exception("http: page %s failed", name)
            status, content_type, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        return Response(body, status, {"cache-control": "no-store"}, media_type=content_type)

    return Route(name, endpoint, methods=["GET"])


def request_host(request: Request, default: str) -> str:
    """The host the client asked for (the Host header without its port, lower case), or `default` if it is not a
    plain host."""
    host = split_host(request.headers.get("host", ""))
    return host if _HOST.fullmatch(host) else default


def _console_config(ws_port: Callable[[], int | None], tls: bool, default_host: str) -> Route:
    async def endpoint(request: Request) -> Response:
        port = ws_port()
        if port is None:  # the WebSocket listener opens right after this one
            error = {"code": "unavailable", "message": "the hub is starting; retry"}
            return JSONResponse({"error": error}, 503, {"retry-after": "1", "cache-control": "no-store"})
        scheme = "wss" if tls else "ws"
        url = f"{scheme}://{request_host(request, default_host)}:{port}/v1/control"
        return JSONResponse({"control_url": url}, headers={"cache-control": "no-cache"})

    return Route("/console/config.json", endpoint, methods=["GET"])


class _Console(StaticFiles):
    """The console's files; a directory that is not there (yet) answers 404 instead of failing the request."""

    async def check_config(self) -> None:
        if self.directory is not None and Path(self.directory).is_dir():
            await super().check_config()


class _SecurityHeaders:
    """Adds nosniff and the console's Content-Security-Policy to every answer; HTML is revalidated each time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
                headers.append((b"referrer-policy", b"no-referrer"))
                html = any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers)
                if html and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-cache"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def web_app(
    *,
    pages: Mapping[str, Page] | None = None,
    api: RestApi | None = None,
    console_dir: Path | None = None,
    allowed_origins: Sequence[str] = (),
) -> Starlette:
    """The HTTP app: `pages` (path -> blocking page: /metrics, /healthz), the REST API and the console (with `api`),
    CORS for `allowed_origins`.

    `console_dir` (default: the package's `hub/console/`) need not exist: its files are looked up per request.
    """
    routes: list[BaseRoute] = [_page(page, path) for path, page in (pages or {}).items()]
    if api is not None:
        routes.extend(api.routes())
        routes.append(_console_config(api.ws_port, api.tls, api.default_host))
        directory = CONSOLE_DIR if console_dir is None else console_dir
        routes.append(Mount("/", _Console(directory=directory, html=True, check_dir=False), name="console"))
    middleware = [
        Middleware(_SecurityHeaders),
        Middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Retry-After", "WWW-Authenticate"],
            max_age=600,
        ),
    ]
    return Starlette(routes=routes, middleware=middleware)
