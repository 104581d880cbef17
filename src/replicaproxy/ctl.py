"""``replicaproxy ctl``: talk to a running proxy's admin HTTP API.

Plain functions (``fetch_status``, ``post``) do the HTTP with the standard library and raise
``CtlError`` with a one-line message; the ``ctl`` click group turns that into
``click.ClickException`` (exit code 1).
"""

from __future__ import annotations

import http.client
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from replicaproxy.config import ConfigError, parse_address

__all__ = ["DEFAULT_ADMIN", "CtlError", "ctl", "fetch_status", "post", "render_status"]

#: Where ``ctl`` looks for the admin API unless told otherwise.
DEFAULT_ADMIN = "127.0.0.1:9901"

#: Width of the status table when stdout is not a terminal (a pipe, a file, a test), wide
#: enough that a typical table never wraps; on a terminal rich uses the terminal's width.
PLAIN_WIDTH = 120

_HINT = "is `replicaproxy run` started with --admin?"

# Ask the admin API directly, never through http_proxy / HTTP_PROXY from the environment:
# it listens on loopback or a management network, which a proxy cannot reach the same way.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CtlError(Exception):
    """The admin API could not be asked, or refused; the message is one line for the user."""


def fetch_status(admin: str, token: str = "", timeout: float = 5.0) -> dict[str, Any]:
    """``GET /status`` from the admin API at ``admin`` (``HOST:PORT``)."""
    return _request(admin, "GET", "/status", token, timeout)


def post(admin: str, path: str, token: str = "", timeout: float = 5.0) -> dict[str, Any]:
    """``POST path`` (e.g. ``/backends/mv2/promote``) to the admin API; its JSON answer."""
    return _request(admin, "POST", path, token, timeout)


def _request(admin: str, method: str, path: str, token: str, timeout: float) -> dict[str, Any]:
    try:
        where = str(parse_address(admin, where="--admin"))
    except ConfigError as exc:
        raise CtlError(str(exc)) from None
    headers = {"Accept": "application/json", "User-Agent": "replicaproxy-ctl"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://{where}{path}",
        method=method,
        headers=headers,
        data=b"" if method == "POST" else None,
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            body: bytes = response.read()
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise CtlError(_http_error_message(where, exc)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise CtlError(_timeout_message(where, timeout)) from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise CtlError(f"cannot reach the admin API at {where}: {text} ({_HINT})") from None
    except TimeoutError:
        raise CtlError(_timeout_message(where, timeout)) from None
    except (OSError, http.client.HTTPException) as exc:
        # The connection was made, then broke or carried something that is not HTTP.
        detail = str(exc) or type(exc).__name__
        raise CtlError(f"bad answer from the admin API at {where}: {detail}") from None
    answer = _json_object(body)
    if answer is None:
        raise CtlError(
            f"the admin API at {where} answered {method} {path} with something that is not "
            f"a JSON object (Content-Type {content_type or 'none'!r})"
        )
    return answer


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _http_error_message(where: str, exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read()
    except (OSError, http.client.HTTPException):
        body = b""
    answer = _json_object(body)
    error = answer.get("error") if answer is not None else None
    if isinstance(error, str) and error:
        return f"{error} (HTTP {exc.code})"
    return f"the admin API at {where} answered HTTP {exc.code} {exc.reason}"


def _timeout_message(where: str, timeout: float) -> str:
    return f"the admin API at {where} did not answer within {timeout:g}s"


def render_status(status: dict[str, Any], console: Console) -> None:
    """Print ``status`` (as ``GET /status`` returns it) as a header line and a table."""
    console.print(
        Text(
            f"epoch {status.get('epoch', '?')}  primary {status.get('primary', '?')}  "
            f"mode {status.get('mode', '?')}"
        )
    )
    table = Table("backend", "address", "role", "state", "health")
    table.add_column("sessions", justify="right")
    for backend in status.get("backends", []):
        styles = []
        if backend.get("state") == "stale":
            styles.append("red")
        elif backend.get("health") == "down":
            styles.append("yellow")
        if backend.get("role") == "primary":
            styles.append("bold")
        # Text, not str: rich would read "[...]" in a name or address as markup.
        table.add_row(
            *(
                Text(str(backend.get(key, "")))
                for key in ("name", "address", "role", "state", "health", "sessions")
            ),
            style=" ".join(styles) or None,
        )
    console.print(table)


@dataclass(frozen=True)
class _Target:
    admin: str
    token: str


_pass_target = click.make_pass_decorator(_Target)


@click.group("ctl")
@click.option(
    "--admin",
    metavar="HOST:PORT",
    default=DEFAULT_ADMIN,
    show_default=True,
    envvar="REPLICAPROXY_ADMIN",
    help="Address of the proxy's admin API (env REPLICAPROXY_ADMIN).",
)
@click.option(
    "--token",
    metavar="T",
    default="",
    envvar="REPLICAPROXY_TOKEN",
    help="Bearer token for promote / mark-synced (env REPLICAPROXY_TOKEN, which other "
    "users cannot see in the process list).",
)
@click.pass_context
def ctl(ctx: click.Context, admin: str, token: str) -> None:
    """Ask a running proxy for its status, or to promote or mark a backend in sync."""
    ctx.obj = _Target(admin=admin, token=token)


@ctl.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
@_pass_target
def status_command(target: _Target, as_json: bool) -> None:
    """Show the view (epoch, primary, mode) and every backend."""
    status = _call(lambda: fetch_status(target.admin, target.token))
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    # Not a terminal: rich prints no ANSI codes; a fixed width keeps rows from wrapping.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else PLAIN_WIDTH)
    render_status(status, console)


@ctl.command("promote")
@click.argument("name")
@_pass_target
def promote_command(target: _Target, name: str) -> None:
    """Make the in-sync replica NAME the primary (planned switchover)."""
    status = _call(lambda: post(target.admin, _backend_path(name, "promote"), target.token))
    click.echo(f"promoted {name}: epoch {status.get('epoch')}, primary {status.get('primary')}")


@ctl.command("mark-synced")
@click.argument("name")
@_pass_target
def mark_synced_command(target: _Target, name: str) -> None:
    """Declare that NAME holds the primary's data again (after copying it over)."""
    status = _call(lambda: post(target.admin, _backend_path(name, "mark-synced"), target.token))
    click.echo(f"{name} marked in sync: epoch {status.get('epoch')}")


def _backend_path(name: str, action: str) -> str:
    return f"/backends/{quote(name, safe='')}/{action}"


def _call(request: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return request()
    except CtlError as exc:
        raise click.ClickException(str(exc)) from None
