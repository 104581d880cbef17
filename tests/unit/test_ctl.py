"""``replicaproxy ctl`` against a real admin API (in-memory Control) on loopback.

The admin server runs in its own thread's event loop, because ctl's urllib calls block: run
on the test's loop they would wait forever for a server that cannot answer.
"""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from fake_control import FakeBackend, FakeControl
from fake_control import serve_in_thread as admin_api
from replicaproxy.ctl import (
    PLAIN_WIDTH,
    CtlError,
    ctl,
    fetch_events,
    fetch_status,
    human_bytes,
    post,
    render_status,
)
from replicaproxy.tls import server_context

#: The bound on any single wait in these tests (server start/stop, a thread to finish).
WAIT = 10.0
TOKEN = "s3cret-token"
HINT = "(is `replicaproxy run` started with --admin?)"


@contextmanager
def one_answer(raw: bytes) -> Iterator[str]:
    """A server that reads one request, answers ``raw`` bytes and closes; yield HOST:PORT.

    Empty ``raw``: it never answers, it waits for the client to give up.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)

    def answer() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(WAIT)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            if raw:
                conn.sendall(raw)
            else:
                while conn.recv(4096):  # until the client closes
                    pass

    thread = threading.Thread(target=answer, name="one-answer", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(WAIT)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, read, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``ctl ARGS`` with no color forced and no ctl settings from the real environment."""
    clean: dict[str, str | None] = {
        "FORCE_COLOR": None,
        "TTY_COMPATIBLE": None,
        "REPLICAPROXY_ADMIN": None,
        "REPLICAPROXY_TOKEN": None,
        "REPLICAPROXY_CACERT": None,
    }
    clean.update(env or {})
    return CliRunner(env=clean).invoke(ctl, list(args))


@pytest.fixture
def fake() -> FakeControl:
    return FakeControl()


@pytest.fixture
def admin(fake: FakeControl) -> Iterator[str]:
    with admin_api(fake) as address:
        yield address


# --------------------------------------------------------------------------- status


HEADER = [
    "backend",
    "address",
    "role",
    "state",
    "health",
    "sessions",
    "bytes to",
    "bytes from",
    "lag",
    "divergences",
]


def test_status_prints_a_plain_table(admin: str) -> None:
    result = invoke("--admin", admin, "status")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == "epoch 1  primary mv1  mode async  up 1h 2m 5s  sessions 2 open, 40 total"
    assert max(len(line) for line in lines) <= PLAIN_WIDTH
    rows = {cells[0]: cells[1:] for cells in (_cells(line) for line in lines) if cells}
    assert rows["backend"] == HEADER[1:]
    assert rows["mv1"] == [
        "127.0.0.1:7001", "primary", "in_sync", "up", "2", "4.88 KiB", "1.17 KiB", "0 B", "0"
    ]  # fmt: skip
    assert rows["mv2"] == [
        "127.0.0.1:7002", "replica", "in_sync", "up", "0", "4.88 KiB", "1.17 KiB", "0 B", "0"
    ]  # fmt: skip
    assert rows["mv3"] == [
        "127.0.0.1:7003", "replica", "stale", "down", "0", "0 B", "0 B", "0 B", "0"
    ]  # fmt: skip
    assert rows["canary"] == [
        "127.0.0.1:7004", "shadow", "in_sync", "up", "0", "3.00 MiB", "1.50 KiB", "2.00 KiB", "1"
    ]  # fmt: skip


def test_status_from_a_proxy_without_the_new_fields(admin: str, fake: FakeControl) -> None:
    fake.legacy_status = True
    result = invoke("--admin", admin, "status")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "epoch 1  primary mv1  mode async"
    rows = {cells[0]: cells[1:] for cells in (_cells(line) for line in lines) if cells}
    assert rows["backend"] == HEADER[1:6]
    assert rows["mv3"] == ["127.0.0.1:7003", "replica", "stale", "down", "0"]


def test_status_shows_only_the_columns_some_backend_has(fake: FakeControl) -> None:
    status = fake.status()
    for backend in status["backends"]:
        del backend["lag_bytes"]
    del status["backends"][0]["divergences"]
    status["draining"] = True
    out = io.StringIO()
    render_status(status, Console(file=out, width=PLAIN_WIDTH))
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("  DRAINING")
    status["last_stop"] = "unclean"
    out = io.StringIO()
    render_status(status, Console(file=out, width=PLAIN_WIDTH))
    assert (
        out.getvalue()
        .splitlines()[0]
        .endswith("  DRAINING  LAST STOP UNCLEAN (replicas made stale)")
    )
    rows = {cells[0]: cells[1:] for cells in (_cells(line) for line in lines) if cells}
    assert rows["backend"] == [*HEADER[1:8], "divergences"]
    assert rows["mv1"][-2:] == ["1.17 KiB", ""]  # bytes from, then no divergences
    assert rows["canary"][-1] == "1"


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (10 * 1024, "10.0 KiB"),
        (1023 * 1024, "1023 KiB"),
        (5 * 1024**3, "5.00 GiB"),
        (3 * 1024**6, "3072 PiB"),
    ],
)
def test_human_bytes(count: int, shown: str) -> None:
    assert human_bytes(count) == shown


def test_status_table_does_not_wrap_past_80_columns(admin: str, fake: FakeControl) -> None:
    address = "db-west-2.internal.example.com:7005"
    fake.backends.append(
        FakeBackend("replica-west", address, "replica", sessions=12345, bytes_to=10**12)
    )
    result = invoke("--admin", admin, "status")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "replica-west" in line)
    assert _cells(row) == [
        "replica-west", address, "replica", "in_sync", "up", "12345", "931 GiB", "0 B", "0 B", "0"
    ]  # fmt: skip
    assert len(row) > 80


def test_status_table_styles_stale_down_and_primary_rows(fake: FakeControl) -> None:
    fake.backends[1].health = "down"
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="standard", width=120)
    render_status(fake.status(), console)
    lines = out.getvalue().splitlines()[1:]
    rows = {cells[0]: line for line in lines if (cells := _cells(_ANSI.sub("", line)))}
    assert set(_ANSI.findall(rows["mv1"])) == {"\x1b[1m", "\x1b[0m"}  # the primary: bold
    assert set(_ANSI.findall(rows["mv2"])) == {"\x1b[33m", "\x1b[0m"}  # in sync, down: yellow
    assert set(_ANSI.findall(rows["mv3"])) == {"\x1b[31m", "\x1b[0m"}  # stale: red
    # A shadow that diverged: only the divergences cell stands out.
    assert set(_ANSI.findall(rows["canary"])) == {"\x1b[1;35m", "\x1b[0m"}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _cells(line: str) -> list[str]:
    """The cells of a table row (empty for a border line); empty cells kept inside a row."""
    parts = re.split(r"[│┃]", line)
    if len(parts) < 3:
        return []
    return [part.strip() for part in parts[1:-1]]


def test_status_json_is_the_status(admin: str, fake: FakeControl) -> None:
    result = invoke("--admin", admin, "status", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == fake.status()
    assert result.stdout.startswith('{\n  "epoch": 1,')


def test_the_admin_address_given_twice_is_a_usage_error(admin: str) -> None:
    result = invoke("--admin", admin, "--admin", f"127.0.0.1:{closed_port()}", "status")
    assert result.exit_code == 2, result.output
    assert "'--admin': given 2 times" in result.output


def test_admin_address_from_the_environment(admin: str) -> None:
    result = invoke("status", "--json", env={"REPLICAPROXY_ADMIN": admin})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["primary"] == "mv1"


def test_fetch_status_and_post_return_the_answer(admin: str, fake: FakeControl) -> None:
    assert fetch_status(admin) == fake.status()
    assert post(admin, "/backends/mv2/promote")["primary"] == "mv2"
    assert fake.primary == "mv2"


# --------------------------------------------------------------------------- acting


def test_promote(admin: str, fake: FakeControl) -> None:
    result = invoke("--admin", admin, "promote", "mv2")
    assert result.exit_code == 0, result.output
    assert result.stdout == "promoted mv2: epoch 2, primary mv2\n"
    assert fake.primary == "mv2"


def test_mark_synced(admin: str, fake: FakeControl) -> None:
    result = invoke("--admin", admin, "mark-synced", "mv3")
    assert result.exit_code == 0, result.output
    assert result.stdout == "mv3 marked in sync: epoch 2\n"
    assert fake.backends[2].state == "in_sync"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["promote", "mv3"], "backend 'mv3' is stale and cannot be promoted (HTTP 409)"),
        (["promote", "nope"], "no backend named 'nope' (HTTP 404)"),
        (["promote", "no/such"], "no backend named 'no/such' (HTTP 404)"),
        (["mark-synced", "mv2"], "backend 'mv2' is already in sync (HTTP 409)"),
    ],
)
def test_a_refusal_exits_1_with_the_servers_message(
    admin: str, fake: FakeControl, args: list[str], message: str
) -> None:
    before = fake.snapshot()
    result = invoke("--admin", admin, *args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: {message}\n"
    assert fake.snapshot() == before


def test_fetch_events_since(admin: str, fake: FakeControl) -> None:
    assert fetch_events(admin) == fake.events(0)
    assert [e["id"] for e in fetch_events(admin, since=1)] == [2]
    assert fetch_events(admin, since=2) == []


# --------------------------------------------------------------------------- events


def _local(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def test_events_lists_time_kind_backend_epoch_message(admin: str, fake: FakeControl) -> None:
    fake.add_event("reload", None, "added shadow canary2\n(127.0.0.1:7005)")
    result = invoke("--admin", admin, "events")
    assert result.exit_code == 0, result.output
    t0 = fake.event_log[0]["time"]
    assert result.stdout.splitlines() == [
        f"{_local(t0)}  health  mv3  epoch 1  mv3 is down: connection refused",
        f"{_local(t0 + 1)}  stale   mv3  epoch 1  health check saw it down; it may restart empty",
        f"{_local(t0 + 2)}  reload  -    epoch 1  added shadow canary2 (127.0.0.1:7005)",
    ]


def test_events_since(admin: str) -> None:
    result = invoke("--admin", admin, "events", "--since", "1")
    assert result.exit_code == 0, result.output
    assert [line.split()[2] for line in result.stdout.splitlines()] == ["stale"]


@pytest.mark.parametrize(
    ("args", "out"), [([], "no events\n"), (["--since", "2"], "no events after id 2\n")]
)
def test_no_events(admin: str, fake: FakeControl, args: list[str], out: str) -> None:
    if not args:
        fake.event_log.clear()
    result = invoke("--admin", admin, "events", *args)
    assert result.exit_code == 0, result.output
    assert result.stdout == out


def test_events_json(admin: str, fake: FakeControl) -> None:
    result = invoke("--admin", admin, "events", "--json", "--since", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == fake.events(1)


def test_a_negative_since_is_a_usage_error(admin: str) -> None:
    result = invoke("--admin", admin, "events", "--since", "-1")
    assert result.exit_code == 2
    assert "--since" in result.stderr


def test_events_from_a_proxy_without_them_is_an_error() -> None:
    body = b'{"error": "no such path: /events"}'
    raw = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
    raw += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    with one_answer(raw) as address:
        result = invoke("--admin", address, "events")
    assert result.exit_code == 1
    assert result.stderr == "Error: no such path: /events (HTTP 404)\n"


def test_an_events_answer_without_a_list_is_an_error() -> None:
    body = b'{"events": {"1": "x"}}'
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    raw += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    with one_answer(raw) as address, pytest.raises(CtlError) as caught:
        fetch_events(address)
    assert str(caught.value).startswith(
        f"the admin API at {address} answered GET /events without a list of events"
    )


# --------------------------------------------------------------------------- reload, drain


def test_reload(admin: str, fake: FakeControl) -> None:
    result = invoke("--admin", admin, "reload")
    assert result.exit_code == 0, result.output
    assert result.stdout == "reloaded: added shadow canary2 (127.0.0.1:7005)\n"
    assert fake.reload_with.calls == 1


def test_reload_that_changes_nothing(admin: str, fake: FakeControl) -> None:
    fake.reload_with.changes = []
    result = invoke("--admin", admin, "reload")
    assert result.exit_code == 0, result.output
    assert result.stdout == "reloaded: nothing changed\n"


@pytest.mark.parametrize(
    ("error", "no_file", "message"),
    [
        (
            "proxy.mode: expected 'async' or 'sync', got 'fast'",
            False,
            "reload rejected, the running config is kept: "
            "proxy.mode: expected 'async' or 'sync', got 'fast' (HTTP 400)",
        ),
        ("", True, "nothing to reload: the proxy was started without --config (HTTP 409)"),
    ],
)
def test_a_refused_reload_exits_1_with_the_servers_message(
    admin: str, fake: FakeControl, error: str, no_file: bool, message: str
) -> None:
    fake.reload_with.error = error
    fake.reload_with.no_file = no_file
    result = invoke("--admin", admin, "reload")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: {message}\n"
    assert fake.reload_with.calls == 1


def test_drain(admin: str, fake: FakeControl) -> None:
    result = invoke("--admin", admin, "drain")
    assert result.exit_code == 0, result.output
    assert result.stdout == "draining: 2 sessions open; the proxy exits when they have ended\n"
    assert fake.draining


# --------------------------------------------------------------------------- token


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--token", TOKEN], {}),
        ([], {"REPLICAPROXY_TOKEN": TOKEN}),
    ],
    ids=["flag", "env"],
)
def test_the_token_is_sent(args: list[str], env: dict[str, str]) -> None:
    fake = FakeControl()
    with admin_api(fake, token=TOKEN) as address:
        result = invoke("--admin", address, *args, "promote", "mv2", env=env)
    assert result.exit_code == 0, result.output
    assert fake.primary == "mv2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "this request needs 'Authorization: Bearer <token>' (HTTP 401)"),
        (["--token", "wrong"], "wrong token (HTTP 403)"),
    ],
)
@pytest.mark.parametrize("command", [["mark-synced", "mv3"], ["reload"], ["drain"]])
def test_a_missing_or_wrong_token_exits_1(
    args: list[str], message: str, command: list[str]
) -> None:
    fake = FakeControl()
    before = fake.snapshot()
    with admin_api(fake, token=TOKEN) as address:
        result = invoke("--admin", address, *args, *command)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {message}\n"
    assert fake.snapshot() == before


@pytest.mark.parametrize("command", [["reload"], ["drain"]])
def test_reload_and_drain_send_the_token(command: list[str]) -> None:
    fake = FakeControl()
    with admin_api(fake, token=TOKEN) as address:
        result = invoke("--admin", address, "--token", TOKEN, *command)
    assert result.exit_code == 0, result.output
    assert (fake.reload_with.calls, fake.draining) == (
        (1, False) if command == ["reload"] else (0, True)
    )


# --------------------------------------------------------------------------- failures


def test_an_unreachable_admin_api_exits_1_saying_so() -> None:
    port = closed_port()
    result = invoke("--admin", f"127.0.0.1:{port}", "status")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: cannot reach the admin API at 127.0.0.1:{port}: Connection refused {HINT}\n"
    )


def test_a_bad_admin_address_exits_1_naming_the_flag() -> None:
    result = invoke("--admin", "nonsense", "status")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --admin: expected 'HOST:PORT'")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b"<html>hello</html>", "text/html"), (b"[1, 2]", "application/json")],
)
def test_an_answer_that_is_not_a_json_object_is_an_error(body: bytes, content_type: str) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        content_type.encode(),
        len(body),
        body,
    )
    with one_answer(raw) as address, pytest.raises(CtlError) as caught:
        fetch_status(address)
    assert str(caught.value) == (
        f"the admin API at {address} answered GET /status with something that is not "
        f"a JSON object (Content-Type {content_type!r})"
    )


def test_an_http_error_without_json_names_the_code() -> None:
    raw = b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nbad"
    with one_answer(raw) as address, pytest.raises(CtlError) as caught:
        post(address, "/backends/mv2/promote")
    assert str(caught.value) == f"the admin API at {address} answered HTTP 502 Bad Gateway"


def test_an_answer_that_is_not_http_is_an_error() -> None:
    with one_answer(b"SSH-2.0-OpenSSH_9.6\r\n") as address, pytest.raises(CtlError) as caught:
        fetch_status(address)
    assert str(caught.value).startswith(f"bad answer from the admin API at {address}: ")


def test_no_answer_times_out() -> None:
    with one_answer(b"") as address, pytest.raises(CtlError) as caught:
        fetch_status(address, timeout=0.2)
    assert str(caught.value) == f"the admin API at {address} did not answer within 0.2s"


# --------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from support import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def https_admin(fake: FakeControl, certs: Any) -> Iterator[str]:
    tls = server_context(str(certs.server.cert), str(certs.server.key))
    with admin_api(fake, tls=tls) as address:
        yield address


def test_cacert_speaks_https_to_the_admin_api(https_admin: str, certs: Any) -> None:
    result = invoke("--admin", https_admin, "--cacert", str(certs.ca), "status", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["primary"] == "mv1"
    env = {"REPLICAPROXY_CACERT": str(certs.ca)}
    assert invoke("--admin", https_admin, "reload", env=env).exit_code == 0
    assert fetch_status(https_admin, cacert=str(certs.ca))["primary"] == "mv1"


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("other CA", "no TLS connection to the admin API at 127.0.0.1:{port}: TLS: "
         "certificate verify failed: unable to get local issuer certificate"),
        ("none", "bad answer from the admin API at 127.0.0.1:{port}: Remote end closed "
         "connection without response (if it speaks HTTPS, give --cacert)"),
        ("missing", "--cacert: cannot read '/nonexistent/ca.pem': No such file or directory"),
    ],
)  # fmt: skip
def test_https_mistakes_exit_1_saying_what_to_do(
    https_admin: str, certs: Any, which: str, message: str
) -> None:
    given = {"other CA": [str(certs.other_ca)], "none": [], "missing": ["/nonexistent/ca.pem"]}
    flags = [f"--cacert={path}" for path in given[which]]
    result = invoke("--admin", https_admin, *flags, "status")
    assert result.exit_code == 1
    port = https_admin.rsplit(":", 1)[1]
    assert result.output == f"Error: {message.format(port=port)}\n"


def test_cacert_to_a_plain_http_admin_api_says_so(admin: str, certs: Any) -> None:
    result = invoke("--admin", admin, "--cacert", str(certs.ca), "status")
    assert result.exit_code == 1
    assert "TLS: wrong version number (is it plain HTTP? leave out --cacert)" in result.output
