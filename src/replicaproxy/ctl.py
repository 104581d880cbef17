"""``replicaproxy ctl``: talk to a running proxy's admin HTTP API.

Plain functions (``fetch_status``, ``fetch_events``, ``post``) do the HTTP with the standard
library and raise ``CtlError`` with a one-line message; the ``ctl`` click group turns that
into ``click.ClickException`` (exit code 1). With ``cacert`` (``--cacert FILE``) they speak
HTTPS and trust the admin API's certificate if that file's CAs signed it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import sys
import time
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

from replicaproxy.config import ConfigError, load_config, parse_address, parse_view_store
from replicaproxy.logutil import describe_error
from replicaproxy.options import Once
from replicaproxy.tls import TlsFileError, client_context

__all__ = [
    "DEFAULT_ADMIN",
    "CtlError",
    "ctl",
    "fetch_events",
    "fetch_status",
    "human_bytes",
    "post",
    "render_events",
    "render_status",
]

#: Where ``ctl`` looks for the admin API unless told otherwise.
DEFAULT_ADMIN = "127.0.0.1:9901"

#: Width of the status table when stdout is not a terminal (a pipe, a file, a test), wide
#: enough that a typical table (ten columns, a 35-character address) never wraps; on a
#: terminal rich uses the terminal's width.
PLAIN_WIDTH = 160

_HINT = "is `replicaproxy run` started with --admin?"

# Ask the admin API directly, never through http_proxy / HTTP_PROXY from the environment:
# it listens on loopback or a management network, which a proxy cannot reach the same way.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CtlError(Exception):
    """The admin API could not be asked, or refused; the message is one line for the user."""


def fetch_status(
    admin: str, token: str = "", timeout: float = 5.0, *, cacert: str = ""
) -> dict[str, Any]:
    """``GET /status`` from the admin API at ``admin`` (``HOST:PORT``)."""
    return _request(admin, "GET", "/status", token, timeout, cacert)


def fetch_events(
    admin: str, since: int = 0, token: str = "", timeout: float = 5.0, *, cacert: str = ""
) -> list[dict[str, Any]]:
    """``GET /events?since=N`` from the admin API: the events after id ``since``, oldest first."""
    answer = _request(admin, "GET", f"/events?since={since}", token, timeout, cacert)
    events = answer.get("events")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise CtlError(
            f"the admin API at {admin} answered GET /events without a list of events "
            "(is the proxy older than `ctl events`?)"
        )
    return events


def post(
    admin: str, path: str, token: str = "", timeout: float = 5.0, *, cacert: str = ""
) -> dict[str, Any]:
    """``POST path`` (e.g. ``/backends/mv2/promote``) to the admin API; its JSON answer."""
    return _request(admin, "POST", path, token, timeout, cacert)


def _opener(cacert: str) -> urllib.request.OpenerDirector:
    """Plain HTTP, or HTTPS trusting the CAs in ``cacert`` (and checking the address)."""
    if not cacert:
        return _OPENER
    try:
        context = client_context(ca=cacert)
    except TlsFileError as exc:
        raise CtlError(f"--cacert: {exc.message}") from None
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )


def _request(
    admin: str, method: str, path: str, token: str, timeout: float, cacert: str = ""
) -> dict[str, Any]:
    try:
        where = str(parse_address(admin, where="--admin"))
    except ConfigError as exc:
        raise CtlError(str(exc)) from None
    opener = _opener(cacert)
    scheme = "https" if cacert else "http"
    headers = {"Accept": "application/json", "User-Agent": "replicaproxy-ctl"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{scheme}://{where}{path}",
        method=method,
        headers=headers,
        data=b"" if method == "POST" else None,
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            body: bytes = response.read()
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise CtlError(_http_error_message(where, exc)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise CtlError(_timeout_message(where, timeout)) from None
        if isinstance(reason, ssl.SSLError):
            raise CtlError(_tls_message(where, reason)) from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise CtlError(f"cannot reach the admin API at {where}: {text} ({_HINT})") from None
    except TimeoutError:
        raise CtlError(_timeout_message(where, timeout)) from None
    except ssl.SSLError as exc:
        raise CtlError(_tls_message(where, exc)) from None
    except (OSError, http.client.HTTPException) as exc:
        # The connection was made, then broke or carried something that is not HTTP.
        detail = str(exc) or type(exc).__name__
        # An HTTPS listener hangs up on plain HTTP without a word.
        hint = "" if cacert else " (if it speaks HTTPS, give --cacert)"
        raise CtlError(f"bad answer from the admin API at {where}: {detail}{hint}") from None
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


def _tls_message(where: str, exc: ssl.SSLError) -> str:
    hint = " (is it plain HTTP? leave out --cacert)" if exc.reason == "WRONG_VERSION_NUMBER" else ""
    return f"no TLS connection to the admin API at {where}: {describe_error(exc)}{hint}"


def _timeout_message(where: str, timeout: float) -> str:
    return f"the admin API at {where} did not answer within {timeout:g}s"


def human_bytes(count: int | float) -> str:
    """``count`` bytes in binary units, three significant digits: ``512 B``, ``1.50 KiB``."""
    value = float(count)
    index = 0
    while abs(value) >= 1024 and index < len(_UNITS) - 1:
        value /= 1024
        index += 1
    if index == 0:
        return f"{int(count)} B"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {_UNITS[index]}"


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _duration(seconds: float) -> str:
    """``3725.5`` -> ``1h 2m 5s``: the largest units, at most three of them."""
    left = int(seconds)
    days, left = divmod(left, 86400)
    hours, left = divmod(left, 3600)
    minutes, secs = divmod(left, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Columns a status may have or lack (a proxy older than them answers without): the key, the
# header, and how a value is shown.
_OPTIONAL_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("bytes_to", "bytes to", human_bytes),
    ("bytes_from", "bytes from", human_bytes),
    ("lag_bytes", "lag", human_bytes),
    ("divergences", "divergences", str),
    ("allowed_differences", "allowed diffs", str),
)


def render_status(status: dict[str, Any], console: Console) -> None:
    """Print ``status`` (as ``GET /status`` returns it) as a header line and a table.

    Fields a proxy may not report (uptime, session counts, byte counts, lag, divergences)
    are shown when present and left out when absent.
    """
    header = [
        f"epoch {status.get('epoch', '?')}",
        f"primary {status.get('primary', '?')}",
        f"mode {status.get('mode', '?')}",
    ]
    protocol = status.get("protocol")
    if isinstance(protocol, dict) and protocol.get("name"):
        header.append(f"protocol {protocol['name']}")
    if _is_number(status.get("uptime")):
        header.append(f"up {_duration(status['uptime'])}")
    if _is_number(status.get("sessions_active")):
        total = status.get("sessions_total")
        of = f", {total} total" if _is_number(total) else ""
        header.append(f"sessions {status['sessions_active']} open{of}")
    if status.get("draining") is True:
        header.append("DRAINING")
    if status.get("last_stop") == "unclean":
        header.append("LAST STOP UNCLEAN (replicas made stale)")
    console.print(Text("  ".join(header)))
    backends = [b for b in status.get("backends", []) if isinstance(b, dict)]
    optional = [column for column in _OPTIONAL_COLUMNS if any(column[0] in b for b in backends)]
    table = Table("backend", "address", "role", "state", "health")
    table.add_column("sessions", justify="right")
    for _key, title, _show in optional:
        table.add_column(title, justify="right")
    for backend in backends:
        styles = []
        if backend.get("state") == "stale":
            styles.append("red")
        elif backend.get("health") == "down":
            styles.append("yellow")
        if backend.get("role") == "primary":
            styles.append("bold")
        # Text, not str: rich would read "[...]" in a name or address as markup.
        cells = [
            Text(str(backend.get(key, "")))
            for key in ("name", "address", "role", "state", "health", "sessions")
        ]
        for key, _title, show in optional:
            value: Any = backend.get(key)
            cell = Text(show(value) if _is_number(value) else "")
            if key == "divergences" and _is_number(value) and value > 0:
                cell.stylize("bold magenta")
            cells.append(cell)
        table.add_row(*cells, style=" ".join(styles) or None)
    console.print(table)
    store = status.get("store")
    if isinstance(store, dict):
        console.print(Text(_store_line(store)))
    proxies = [p for p in status.get("proxies", []) if isinstance(p, dict)]
    if proxies and isinstance(store, dict) and store.get("kind") != "file":
        members = Table("proxy", "listen", "admin", "version", "up")
        now = time.time()
        for p in proxies:
            started: Any = p.get("started")
            members.add_row(
                Text(str(p.get("name", "")) + (" (this one)" if p.get("self") else "")),
                Text(str(p.get("listen") or "")),
                Text(str(p.get("admin") or "")),
                Text(str(p.get("version") or "")),
                Text(_duration(now - float(started)) if _is_number(started) else ""),
            )
        console.print(members)


def _store_line(store: dict[str, Any]) -> str:
    """``view store etcd 127.0.0.1:2379 /prefix: up, revision 12`` (or file PATH)."""
    kind = str(store.get("kind", "?"))
    if kind == "file":
        where = str(store.get("path", ""))
    else:
        endpoints = store.get("endpoints")
        listed = ",".join(str(e) for e in endpoints) if isinstance(endpoints, list) else "?"
        where = f"{listed} {store.get('prefix', '')}"
    state = "up" if store.get("up") else "DOWN"
    if store.get("fenced"):
        state += " (fenced: not serving)"
    revision = store.get("revision")
    rev = f", revision {revision}" if _is_number(revision) else ""
    return f"view store {kind} {where}: {state}{rev}"


def render_events(events: list[dict[str, Any]]) -> list[str]:
    """One aligned line per event: local time, kind, backend, epoch, message."""
    rows = []
    for event in events:
        when = event.get("time")
        rows.append(
            (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
                if _is_number(when)
                else "?",
                str(event.get("kind", "?")),
                "-" if event.get("backend") is None else str(event["backend"]),
                f"epoch {event.get('epoch', '?')}",
                # One event, one line: a message never breaks the list.
                " ".join(str(event.get("message", "")).split()),
            )
        )
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(4)]
    return [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[4]])
        for row in rows
    ]


@dataclass(frozen=True)
class _Target:
    admin: str
    token: str
    view_store: str = ""
    config: str = ""
    cacert: str = ""


_pass_target = click.make_pass_decorator(_Target)


@click.group("ctl")
@click.option(
    "--admin",
    cls=Once,
    metavar="HOST:PORT",
    default=DEFAULT_ADMIN,
    show_default=True,
    envvar="REPLICAPROXY_ADMIN",
    help="Address of the proxy's admin API (env REPLICAPROXY_ADMIN).",
)
@click.option(
    "--token",
    cls=Once,
    metavar="T",
    default="",
    envvar="REPLICAPROXY_TOKEN",
    help="Bearer token for promote / mark-synced / reload / drain (env REPLICAPROXY_TOKEN, "
    "which other users cannot see in the process list).",
)
@click.option(
    "--view-store",
    cls=Once,
    metavar="URL",
    default="",
    envvar="REPLICAPROXY_VIEW_STORE",
    help="Read the shared view from this store (etcd://HOST:PORT[,...]/PREFIX) instead of "
    "asking a proxy: for status with no proxy running, and for import-view "
    "(env REPLICAPROXY_VIEW_STORE).",
)
@click.option(
    "--config",
    "config_path",
    cls=Once,
    metavar="FILE",
    default="",
    help="A proxy config whose view_store and store_* keys (TLS, user) --view-store uses.",
)
@click.option(
    "--cacert",
    cls=Once,
    metavar="FILE",
    default="",
    envvar="REPLICAPROXY_CACERT",
    help="Speak HTTPS to the admin API ([admin] tls_cert), trusting the CA certificates in "
    "FILE (env REPLICAPROXY_CACERT).",
)
@click.pass_context
def ctl(
    ctx: click.Context, admin: str, token: str, view_store: str, config_path: str, cacert: str
) -> None:
    """Ask a running proxy for its status and events, to promote or mark a backend in sync,
    to reload its config, or to drain. With --view-store: read or fill the shared view."""
    ctx.obj = _Target(
        admin=admin, token=token, view_store=view_store, config=config_path, cacert=cacert
    )


@ctl.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
@_pass_target
def status_command(target: _Target, as_json: bool) -> None:
    """Show the view (epoch, primary, mode) and every backend."""
    if target.view_store or target.config:
        status = _call(lambda: _store_status(target))
    else:
        status = _call(lambda: fetch_status(target.admin, target.token, cacert=target.cacert))
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    # Not a terminal: rich prints no ANSI codes; a fixed width keeps rows from wrapping.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else PLAIN_WIDTH)
    render_status(status, console)


@ctl.command("events")
@click.option(
    "--since",
    cls=Once,
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="Only events with an id above N (the proxy keeps the last 200).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON events.")
@_pass_target
def events_command(target: _Target, since: int, as_json: bool) -> None:
    """List recent events (failovers, stale, health, reloads ...), oldest first."""
    events = _call(
        lambda: {"events": fetch_events(target.admin, since, target.token, cacert=target.cacert)}
    )["events"]
    if as_json:
        click.echo(json.dumps(events, indent=2))
        return
    if not events:
        click.echo("no events" + (f" after id {since}" if since else ""))
        return
    for line in render_events(events):
        click.echo(line)


@ctl.command("reload")
@_pass_target
def reload_command(target: _Target) -> None:
    """Re-read the proxy's config file (as SIGHUP does); a rejected config changes nothing."""
    answer = _call(lambda: post(target.admin, "/reload", target.token, cacert=target.cacert))
    changes = answer.get("changes")
    listed = [str(c) for c in changes] if isinstance(changes, list) else []
    click.echo("reloaded: " + ("; ".join(listed) if listed else "nothing changed"))


@ctl.command("drain")
@_pass_target
def drain_command(target: _Target) -> None:
    """Stop accepting sessions; the proxy exits once the open ones have ended."""
    answer = _call(lambda: post(target.admin, "/drain", target.token, cacert=target.cacert))
    click.echo(
        f"draining: {answer.get('sessions', '?')} sessions open; "
        "the proxy exits when they have ended"
    )


@ctl.command("promote")
@click.argument("name")
@_pass_target
def promote_command(target: _Target, name: str) -> None:
    """Make the in-sync replica NAME the primary (planned switchover)."""
    status = _call(
        lambda: post(
            target.admin, _backend_path(name, "promote"), target.token, cacert=target.cacert
        )
    )
    click.echo(f"promoted {name}: epoch {status.get('epoch')}, primary {status.get('primary')}")


@ctl.command("mark-synced")
@click.argument("name")
@_pass_target
def mark_synced_command(target: _Target, name: str) -> None:
    """Declare that NAME holds the primary's data again (after copying it over)."""
    status = _call(
        lambda: post(
            target.admin, _backend_path(name, "mark-synced"), target.token, cacert=target.cacert
        )
    )
    click.echo(f"{name} marked in sync: epoch {status.get('epoch')}")


def _backend_path(name: str, action: str) -> str:
    return f"/backends/{quote(name, safe='')}/{action}"


def _call(request: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return request()
    except CtlError as exc:
        raise click.ClickException(str(exc)) from None


@ctl.command("import-view")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--replace", is_flag=True, help="Replace a view the store already holds (epoch kept rising)."
)
@_pass_target
def import_view_command(target: _Target, file: str, replace: bool) -> None:
    """Move the view in a state FILE into the --view-store (stop the proxy first).

    The view keeps its epoch, primary and stale set. A state file whose proxy did not stop
    cleanly is imported with every replica stale.
    """
    click.echo(_call(lambda: _run(_import_view(target, file, replace=replace))))


def _open_store(target: _Target) -> Any:
    from replicaproxy.server import _store_options
    from replicaproxy.store import StoreOptions, open_store

    url, options = target.view_store, StoreOptions()
    if target.config:
        try:
            config = load_config(target.config)
        except ConfigError as exc:
            raise CtlError(str(exc)) from None
        options = _store_options(config)
        url = url or config.proxy.store_url
    if not url.startswith("etcd://") and not url.startswith("file:"):
        raise CtlError(f"--view-store: expected file:PATH or etcd://HOST:PORT/PREFIX, got {url!r}")
    try:
        parse_view_store(url, where="--view-store")
    except ConfigError as exc:
        raise CtlError(str(exc)) from None
    return open_store(url, options=options)


def _run(coro: Any) -> Any:
    from replicaproxy.store import StateError

    try:
        return asyncio.run(coro)
    except StateError as exc:
        raise CtlError(str(exc)) from None


def _store_status(target: _Target) -> dict[str, Any]:
    """A status built from the store alone (no proxy asked): the view and the members."""
    store = _open_store(target)

    async def read() -> dict[str, Any]:
        try:
            snapshot = await store.snapshot()
        finally:
            await store.close()
        about = store.describe()
        if snapshot.view is None:
            raise CtlError(f"no view in {target.view_store or target.config} yet")
        view = snapshot.view.view
        return {
            "epoch": view.epoch,
            "primary": view.primary,
            "mode": "?",
            "clean": view.clean,
            "backends": [
                {
                    "name": name,
                    "address": "",
                    "role": "primary" if name == view.primary else "replica",
                    "state": state,
                    "health": "",
                    "sessions": "",
                }
                for name, state in view.backends.items()
            ],
            "store": {**about, "up": True, "revision": snapshot.view.revision},
            "proxies": [
                {**m.describe(), "listed": m.name in view.proxies}
                for m in sorted(snapshot.members.values(), key=lambda m: m.name)
            ],
            "listed_proxies": dict(view.proxies),
        }

    answer: dict[str, Any] = _run(read())
    return answer


async def _import_view(target: _Target, file: str, *, replace: bool) -> str:
    from replicaproxy.store import FileStateStore

    store = _open_store(target)
    if store.kind != "etcd":
        raise CtlError("--view-store: import-view moves a state file into etcd: give etcd://...")
    view = FileStateStore(file).load()
    if view is None:
        raise CtlError(f"{file}: no such state file")
    notes = ""
    if view.unclean_runs({}):
        # Its proxy died with bytes in flight (or still runs): no replica can be trusted.
        view = view.after_unclean_stop(view.unclean_runs({}))
        notes = " (its proxy did not stop cleanly: every replica imported stale)"
    view = view.with_proxies({})
    try:
        snapshot = await store.snapshot()
        revision = None
        if snapshot.view is not None:
            held = snapshot.view.view
            if not replace:
                raise CtlError(
                    f"{store.describe()['prefix']}/view already holds a view (epoch "
                    f"{held.epoch}, primary {held.primary}); nothing imported (--replace)"
                )
            if snapshot.members:
                raise CtlError(
                    f"proxies {', '.join(sorted(snapshot.members))} run on the view: stop "
                    "them before replacing it"
                )
            revision = snapshot.view.revision
            from replicaproxy.core.view import View

            # The epoch never goes back, on any proxy that saw the held view.
            epoch = max(view.epoch, held.epoch + 1)
            view = View(epoch, view.primary, dict(view.backends), True)
        stored = await store.swap(revision, view)
    finally:
        await store.close()
    if stored is None:
        raise CtlError("the view changed while importing; nothing imported (try again)")
    stale = [n for n, s in view.backends.items() if s == "stale"]
    return (
        f"imported view epoch {view.epoch} (primary {view.primary}"
        f"{', stale: ' + ', '.join(stale) if stale else ''}) at revision {stored.revision}"
        f"{notes}"
    )
