"""The admin HTTP API (aiohttp): read the proxy's state, ask it to act.

Routes::

    GET  /                           the status page (static/status.html, self-contained)
    GET  /status                     Control.status() as JSON
    GET  /events?since=N             {"events": Control.events(N)} (N defaults to 0)
    GET  /metrics                    Prometheus text from Control.registry
    POST /backends/{name}/promote    Control.promote(name), answered as JSON
    POST /backends/{name}/mark-synced  Control.mark_synced(name), answered as JSON
    POST /reload                     Control.reload(), answered as JSON
    POST /drain                      Control.drain(), answered as JSON

Every error is JSON ``{"error": "message"}`` with a 4xx/5xx code: a ``ControlError`` keeps
its code and message, aiohttp's own errors (404, 405 with ``Allow``, 413) keep theirs, and a
bug in a handler is logged with its traceback and answered 500 without stopping the server.

A POST needs ``Authorization: Bearer <token>`` when a token is set (401 without it, 403 with
a wrong one), and is refused (403) when a browser says it comes from another site, so a web
page the operator happens to visit cannot promote a backend through the loopback listener.
The API only talks to the proxy through ``Control`` (DESIGN.md "Layout").
"""

from __future__ import annotations

import functools
import hmac
import importlib.resources
import inspect
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replicaproxy.config import Address, is_loopback
from replicaproxy.control import Answer, Control, ControlError

__all__ = ["MAX_BODY", "PAGE_HEADERS", "AdminServer", "index_html", "make_app"]

log = logging.getLogger(__name__)

#: Largest request body accepted (bytes). POST bodies carry nothing and are ignored; the limit
#: is far above any real request yet small enough that no client can make the proxy buffer
#: much (aiohttp's own default is 1 MiB).
MAX_BODY = 64 * 1024

#: Seconds ``AdminServer.stop`` waits for requests in flight. Handlers answer from memory in
#: microseconds, so anything still running after this is stuck, not slow.
SHUTDOWN_TIMEOUT = 5.0

#: Longest ``since`` accepted, in digits: a 64-bit event counter never needs more.
_SINCE_DIGITS = 20
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Headers of an aiohttp HTTPException that describe its text body, which the JSON replaces.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})
# Ports an Origin implies when it names none (RFC 6454: the scheme's default port).
_DEFAULT_PORTS = {"http": 80, "https": 443}


#: Headers of the status page. The page is one self-contained file: its script and style are
#: inline, it fetches only this API, it shows no images but data: URLs. Anything else (a
#: script injected through a backend's name, a frame around the page to click-jack the
#: operator) is refused by the browser.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def index_html() -> str:
    """The status page served at ``GET /`` (``static/status.html`` from the package)."""
    page = importlib.resources.files("replicaproxy.admin").joinpath("static", "status.html")
    return page.read_text(encoding="utf-8")


def make_app(control: Control, *, token: str = "", loopback: bool = False) -> web.Application:
    """The admin API as an aiohttp application serving ``control``.

    With a non-empty ``token`` every POST needs ``Authorization: Bearer <token>``.
    With ``loopback`` (the listener is on 127.0.0.0/8 or ::1), a request must name
    the host by address or as ``localhost``: a page whose DNS name was made to
    resolve to 127.0.0.1 (DNS rebinding) is refused.
    """
    api = _Api(control, token)
    middlewares = [_errors_as_json, *([_loopback_host_only] if loopback else [])]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app.router.add_get("/", api.index)
    app.router.add_get("/status", api.status)
    app.router.add_get("/events", api.events)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_post("/backends/{name}/promote", api.promote)
    app.router.add_post("/backends/{name}/mark-synced", api.mark_synced)
    app.router.add_post("/reload", api.reload)
    app.router.add_post("/drain", api.drain)
    return app


class AdminServer:
    """The admin API on a TCP listener, with a start/stop lifecycle; HTTPS with ``tls``."""

    def __init__(
        self,
        control: Control,
        listen: Address,
        *,
        token: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._app = make_app(control, token=token, loopback=is_loopback(listen.host))
        self._listen = listen
        self._tls = tls
        self._scheme = "https" if tls is not None else "http"
        self._runner: web.AppRunner | None = None
        #: The bound address once started (the real port when ``listen`` asked for port 0).
        self.address: Address | None = None

    async def start(self) -> Address:
        """Bind and serve; return the bound address (the real port when port 0 was given).

        An ``OSError`` from binding (address in use, permission) propagates after cleanup.
        """
        if self._runner is not None:
            raise RuntimeError("AdminServer.start() called twice")
        # No aiohttp access log: a Prometheus scrape every few seconds would flood the proxy's
        # log; the requests that change something are logged by _errors_as_json instead.
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, self._listen.host or None, self._listen.port, ssl_context=self._tls
            )
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        # One socket per resolved address (e.g. "localhost" may give 127.0.0.1 and ::1).
        bound = [Address(sockname[0], sockname[1]) for sockname in runner.addresses]
        self.address = bound[0]
        log.info("admin API on %s", ", ".join(f"{self._scheme}://{addr}" for addr in bound))
        return self.address

    async def stop(self) -> None:
        """Stop listening and close connections; does nothing if not started."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
        log.info("admin API on %s://%s stopped", self._scheme, self.address)


class _Api:
    """The request handlers, bound to one Control and token."""

    def __init__(self, control: Control, token: str) -> None:
        self._control = control
        # Bytes, for hmac.compare_digest; surrogatepass so no header value can fail to encode.
        self._token = token.encode("utf-8", "surrogatepass")

    async def index(self, request: web.Request) -> web.Response:
        """``GET /``."""
        return web.Response(
            text=index_html(), content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
        )

    async def status(self, request: web.Request) -> web.Response:
        """``GET /status``."""
        return web.json_response(self._control.status())

    async def events(self, request: web.Request) -> web.Response:
        """``GET /events?since=N``: the events after id ``N`` (all kept ones without it)."""
        since = _since(request.query.getall("since", []))
        return web.json_response({"events": self._control.events(since)})

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``."""
        body = generate_latest(self._control.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def promote(self, request: web.Request) -> web.Response:
        """``POST /backends/{name}/promote``."""
        return await self._act(request, self._control.promote)

    async def mark_synced(self, request: web.Request) -> web.Response:
        """``POST /backends/{name}/mark-synced``."""
        return await self._act(request, self._control.mark_synced)

    async def reload(self, request: web.Request) -> web.Response:
        """``POST /reload``."""
        await _check_mutation(request, self._token)
        return web.json_response(await _settled(self._control.reload()))

    async def drain(self, request: web.Request) -> web.Response:
        """``POST /drain``."""
        await _check_mutation(request, self._token)
        return web.json_response(self._control.drain())

    async def _act(self, request: web.Request, action: Callable[[str], Answer]) -> web.Response:
        await _check_mutation(request, self._token)
        return web.json_response(await _settled(action(request.match_info["name"])))


async def _settled(answer: Answer) -> dict[str, Any]:
    """A Control answer, awaited if it is still on its way (a change waits for its store)."""
    if inspect.isawaitable(answer):
        awaited: Awaitable[dict[str, Any]] = answer
        return await awaited
    return answer


def _since(values: list[str]) -> int:
    """The ``since`` query parameter: one non-negative integer, 0 when absent."""
    if not values:
        return 0
    if len(values) > 1:
        raise web.HTTPBadRequest(text=f"since: given {len(values)} times, expected once")
    text = values[0].strip()
    # isdigit() alone would let "²" or "٣" through; the length bound keeps int() cheap (an id
    # never has more digits than a 64-bit counter's 20).
    if not (text.isascii() and text.isdigit() and len(text) <= _SINCE_DIGITS):
        raise web.HTTPBadRequest(
            text=f"since: expected a non-negative integer (an event id), got {values[0]!r}"
        )
    return int(text)


async def _check_mutation(request: web.Request, token: bytes) -> None:
    """The checks every POST passes before it may change anything: CSRF, token, body size."""
    _check_same_origin(request)
    _check_token(request, token)
    # The body means nothing, but reading it is what enforces client_max_size (413).
    await request.read()


@web.middleware
async def _loopback_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On a loopback listener, accept only Host headers that are addresses or localhost."""
    host = request.headers.get("Host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name.lower() != "localhost":
        try:
            ipaddress.ip_address(name)
        except ValueError:
            raise web.HTTPForbidden(
                text=f"Host {host!r} refused: on loopback the admin API answers only to an "
                "IP address or localhost (a guard against DNS rebinding)"
            ) from None
    return await handler(request)


def _check_same_origin(request: web.Request) -> None:
    """Refuse a POST a browser sent on behalf of another site (CSRF).

    Requests without ``Origin`` (curl, ``replicaproxy ctl``) pass: only browsers add it.
    """
    if request.headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site":
        raise web.HTTPForbidden(text="cross-site request refused (Sec-Fetch-Site: cross-site)")
    origin = request.headers.get("Origin")
    if origin is None:
        return
    host = request.headers.get("Host")
    theirs = _origin_host_port(origin)
    ours = _host_port(host, request.scheme) if host is not None else None
    if theirs is None or ours is None or theirs != ours:
        raise web.HTTPForbidden(
            text=f"cross-origin request refused: Origin {origin!r} is not this admin API "
            f"(Host {host!r})"
        )


def _origin_host_port(origin: str) -> tuple[str, int] | None:
    """``(host, port)`` of an ``Origin`` header value; None for ``null`` or anything odd."""
    return _split_host_port(origin.strip())


def _host_port(host: str, scheme: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``Host`` header value; the port defaults to the scheme's."""
    return _split_host_port(f"{scheme}://{host.strip()}")


def _split_host_port(url: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    # hostname is lowercased by urlsplit, and IPv6 brackets are gone on both sides.
    return parts.hostname, port if port is not None else _DEFAULT_PORTS[parts.scheme]


def _check_token(request: web.Request, token: bytes) -> None:
    """Require ``Authorization: Bearer <token>`` when a token is set."""
    if not token:
        return
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise web.HTTPUnauthorized(
            text="this request needs 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token):
        raise web.HTTPForbidden(text="wrong token")


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error as JSON and log every request that may change something."""
    response: web.StreamResponse
    try:
        response = await handler(request)
        outcome = "ok"
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        outcome = _http_error_message(request, exc)
        headers = [
            (key, value) for key, value in exc.headers.items() if key.lower() not in _BODY_HEADERS
        ]
        response = _json_error(exc.status, outcome, headers)
    except ControlError as exc:
        outcome = exc.message
        response = _json_error(exc.status, outcome)
    except Exception as exc:
        # A bug, not a refusal: keep the traceback, keep serving.
        log.exception("admin API: %s %s failed", request.method, request.path)
        outcome = f"internal error ({type(exc).__name__}); see the proxy's log"
        response = _json_error(500, outcome)
    if request.method not in _SAFE_METHODS:
        log.info(
            "admin API: %s %s from %s: %d %s",
            request.method,
            request.path,
            request.remote,
            response.status,
            outcome,
        )
    return response


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    """A one-line message for one of aiohttp's HTTP errors, or the text we raised it with."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"method {exc.method} not allowed on {request.path} (allowed: {allowed})"
    default_text = f"{exc.status}: {exc.reason}"
    if exc.text and exc.text != default_text:
        return exc.text.strip()
    if isinstance(exc, web.HTTPNotFound):
        return f"no such path: {request.path}"
    return exc.reason


def _json_error(
    status: int, message: str, headers: list[tuple[str, str]] | None = None
) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
