"""The admin HTTP API against an in-memory Control (aiohttp test server on loopback)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fake_control import METRIC, FakeControl
from replicaproxy.admin import AdminServer, make_app
from replicaproxy.admin.app import MAX_BODY, index_html
from replicaproxy.config import Address
from replicaproxy.control import Control

Client = TestClient[web.Request, web.Application]

#: Bound on every request a test makes.
TIMEOUT = aiohttp.ClientTimeout(total=10)
TOKEN = "s3cret-token"


@asynccontextmanager
async def serve(control: Control, token: str = "") -> AsyncIterator[Client]:
    """A client for ``make_app(control)`` served on 127.0.0.1, a free port."""
    async with TestClient(TestServer(make_app(control, token=token)), timeout=TIMEOUT) as client:
        yield client


async def json_of(response: aiohttp.ClientResponse) -> Any:
    """The body as JSON, checking the content type says so."""
    assert response.content_type == "application/json"
    return await response.json()


# --------------------------------------------------------------------------- reading


#: The keys Control.status() documents, at the top and for each backend.
STATUS_KEYS = {
    "epoch",
    "primary",
    "mode",
    "clean",
    "last_stop",
    "uptime",
    "sessions_active",
    "sessions_total",
    "client_bytes",
    "backends",
}
BACKEND_KEYS = {
    "name",
    "address",
    "role",
    "state",
    "health",
    "sessions",
    "divergences",
    "bytes_to",
    "bytes_from",
    "lag_bytes",
}


async def test_status_is_the_controls_status_with_the_documented_keys() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        response = await client.get("/status")
        assert response.status == 200
        body = await json_of(response)
    assert body == fake.status()
    assert set(body) == STATUS_KEYS
    assert set(body["client_bytes"]) == {"from_client", "to_client"}
    assert [b["name"] for b in body["backends"]] == ["mv1", "mv2", "mv3", "canary"]
    for backend in body["backends"]:
        assert set(backend) == BACKEND_KEYS


async def test_status_passes_on_whatever_the_control_answers() -> None:
    fake = FakeControl()
    fake.legacy_status = True
    async with serve(fake) as client:
        body = await json_of(await client.get("/status"))
    assert set(body) == {"epoch", "primary", "mode", "backends"}
    assert body == fake.status()


async def test_metrics_is_prometheus_text_from_the_registry() -> None:
    async with serve(FakeControl()) as client:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    assert f"{METRIC} 3.0" in text.splitlines()


async def test_index_is_the_status_page_with_strict_headers() -> None:
    async with serve(FakeControl()) as client:
        response = await client.get("/")
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        csp = _directives(response.headers["Content-Security-Policy"])
        html = await response.text()
    assert html == index_html()
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'unsafe-inline'"]
    assert csp["style-src"] == ["'unsafe-inline'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert "<title>replicaproxy status</title>" in html
    assert 'href="/status"' in html
    assert 'href="/metrics"' in html


def _directives(policy: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as ``{directive: [sources]}``."""
    parsed: dict[str, list[str]] = {}
    for part in policy.split(";"):
        words = part.split()
        if words:
            assert words[0] not in parsed, f"{words[0]} given twice"
            parsed[words[0]] = words[1:]
    return parsed


def test_the_status_page_is_self_contained_and_never_parses_data_as_html() -> None:
    html = index_html()
    # Nothing from elsewhere: no URL with a scheme or a host, no external script/style/font.
    assert re.findall(r"(?:https?:)?//[\w.-]+\.\w", html) == []
    assert re.findall(r"<(?:script|link|img|iframe)\b[^>]*\bsrc=", html) == []
    assert "@import" not in html
    assert "@font-face" not in html
    # Server-provided text goes through textContent only.
    [script] = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert "textContent" in script
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    # What the browser test and an operator's scripts rely on.
    for anchor in (
        'id="epoch"',
        'id="primary"',
        'id="backends"',
        'id="events"',
        'id="sessions-chart"',
        'id="throughput-chart"',
        'id="disconnected"',
        "fetch(",
        "/events?since=",
    ):
        assert anchor in html


async def test_head_of_the_page_has_its_headers_and_no_body() -> None:
    async with serve(FakeControl()) as client:
        response = await client.head("/")
        assert response.status == 200
        assert response.headers["X-Frame-Options"] == "DENY"
        assert await response.read() == b""


# --------------------------------------------------------------------------- events


async def test_events_are_all_kept_events_oldest_first() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        response = await client.get("/events")
        assert response.status == 200
        body = await json_of(response)
    assert body == {"events": fake.events(0)}
    assert [e["id"] for e in body["events"]] == [1, 2]
    assert set(body["events"][0]) == {"id", "time", "kind", "backend", "epoch", "message"}
    assert body["events"][0]["kind"] == "health"


@pytest.mark.parametrize(("since", "ids"), [("0", [1, 2, 3]), ("1", [2, 3]), ("3", []), ("99", [])])
async def test_events_since_an_id(since: str, ids: list[int]) -> None:
    fake = FakeControl()
    fake.add_event("divergence", "canary", "session 7: differs at byte 12")
    async with serve(fake) as client:
        response = await client.get("/events", params={"since": since})
        assert response.status == 200
        body = await json_of(response)
    assert [e["id"] for e in body["events"]] == ids


async def test_a_change_shows_up_as_an_event() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        assert (await client.post("/backends/mv2/promote")).status == 200
        body = await json_of(await client.get("/events?since=2"))
    [event] = body["events"]
    assert (event["kind"], event["backend"], event["epoch"]) == ("failover", "mv2", 2)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("since=abc", "since: expected a non-negative integer (an event id), got 'abc'"),
        ("since=-1", "since: expected a non-negative integer (an event id), got '-1'"),
        ("since=1.5", "since: expected a non-negative integer (an event id), got '1.5'"),
        ("since=", "since: expected a non-negative integer (an event id), got ''"),
        ("since=%C2%B2", "since: expected a non-negative integer (an event id), got '²'"),
        (
            f"since={'9' * 21}",
            f"since: expected a non-negative integer (an event id), got '{'9' * 21}'",
        ),
        ("since=1&since=2", "since: given 2 times, expected once"),
    ],
)
async def test_a_bad_since_is_400_json(query: str, error: str) -> None:
    async with serve(FakeControl()) as client:
        response = await client.get(f"/events?{query}")
        assert response.status == 400
        assert await json_of(response) == {"error": error}


async def test_events_need_no_token() -> None:
    async with serve(FakeControl(), token=TOKEN) as client:
        assert (await client.get("/events?since=1")).status == 200


# --------------------------------------------------------------------------- acting


async def test_promote_switches_over_and_answers_the_new_status() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        response = await client.post("/backends/mv2/promote")
        assert response.status == 200
        body = await json_of(response)
    assert (body["epoch"], body["primary"]) == (2, "mv2")
    assert (fake.epoch, fake.primary) == (2, "mv2")


async def test_mark_synced_marks_the_replica_in_sync() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        response = await client.post("/backends/mv3/mark-synced")
        assert response.status == 200
        body = await json_of(response)
    assert body["epoch"] == 2
    assert {b["name"]: b["state"] for b in body["backends"]}["mv3"] == "in_sync"
    assert fake.backends[2].state == "in_sync"


async def test_reload_answers_the_changes() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        response = await client.post("/reload")
        assert response.status == 200
        body = await json_of(response)
    assert body == {"ok": True, "changes": ["added shadow canary2 (127.0.0.1:7005)"]}
    assert fake.reload_with.calls == 1
    assert fake.event_log[-1]["kind"] == "reload"


async def test_a_rejected_reload_is_400_with_the_configs_errors() -> None:
    fake = FakeControl()
    fake.reload_with.error = "backend[1].address: expected 'HOST:PORT', got 'nope'"
    async with serve(fake) as client:
        response = await client.post("/reload")
        assert response.status == 400
        body = await json_of(response)
    assert body == {
        "error": "reload rejected, the running config is kept: "
        "backend[1].address: expected 'HOST:PORT', got 'nope'"
    }
    assert fake.reload_with.calls == 1


async def test_a_reload_without_a_config_file_is_409() -> None:
    fake = FakeControl()
    fake.reload_with.no_file = True
    async with serve(fake) as client:
        response = await client.post("/reload")
        assert response.status == 409
        assert "without --config" in (await json_of(response))["error"]


async def test_drain_answers_the_open_sessions_and_may_be_repeated() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        for _ in range(2):
            response = await client.post("/drain")
            assert response.status == 200
            assert await json_of(response) == {"draining": True, "sessions": 2}
    assert fake.draining
    assert [e["kind"] for e in fake.event_log].count("drain") == 1


async def test_a_small_post_body_is_ignored() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        response = await client.post("/backends/mv2/promote", data=b"x" * MAX_BODY)
        assert response.status == 200
    assert fake.primary == "mv2"


async def test_a_mutating_request_is_logged_with_its_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="replicaproxy.admin")
    async with serve(FakeControl()) as client:
        assert (await client.post("/backends/mv2/promote")).status == 200
        assert (await client.post("/backends/nope/promote")).status == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "replicaproxy.admin.app"]
    assert any("POST /backends/mv2/promote" in line and ": 200 ok" in line for line in lines)
    assert any(
        "POST /backends/nope/promote" in line and ": 404 no backend named 'nope'" in line
        for line in lines
    )


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/backends/nope/promote", 404, "no backend named 'nope'"),
        ("/backends/mv3/promote", 409, "backend 'mv3' is stale and cannot be promoted"),
        ("/backends/canary/promote", 409, "backend 'canary' is a shadow and is never promoted"),
        ("/backends/mv1/promote", 409, "backend 'mv1' is already the primary"),
        ("/backends/nope/mark-synced", 404, "no backend named 'nope'"),
        ("/backends/mv2/mark-synced", 409, "backend 'mv2' is already in sync"),
    ],
)
async def test_a_refusal_is_json_with_the_controls_code_and_message(
    path: str, status: int, error: str
) -> None:
    fake = FakeControl()
    before = fake.snapshot()
    async with serve(fake) as client:
        response = await client.post(path)
        assert response.status == status
        assert await json_of(response) == {"error": error}
    assert fake.snapshot() == before


async def test_a_failed_store_is_503() -> None:
    fake = FakeControl()
    fake.store_fails = True
    async with serve(fake) as client:
        response = await client.post("/backends/mv2/promote")
        assert response.status == 503
        assert await json_of(response) == {"error": "cannot store the new view: disk full (fake)"}


# --------------------------------------------------------------------------- HTTP errors


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/status", "GET,HEAD"),
        ("DELETE", "/metrics", "GET,HEAD"),
        ("GET", "/backends/mv2/promote", "POST"),
        ("PUT", "/backends/mv3/mark-synced", "POST"),
        ("GET", "/reload", "POST"),
        ("GET", "/drain", "POST"),
        ("POST", "/events", "GET,HEAD"),
    ],
)
async def test_a_wrong_method_is_405_json_with_allow(method: str, path: str, allow: str) -> None:
    fake = FakeControl()
    before = fake.snapshot()
    async with serve(fake) as client:
        response = await client.request(method, path)
        assert response.status == 405
        assert response.headers["Allow"] == allow
        body = await json_of(response)
    assert body == {
        "error": f"method {method} not allowed on {path} (allowed: {allow.replace(',', ', ')})"
    }
    assert fake.snapshot() == before


@pytest.mark.parametrize("path", ["/nope", "/status/", "/backends/mv2", "/backends//promote"])
async def test_an_unknown_path_is_404_json(path: str) -> None:
    async with serve(FakeControl()) as client:
        response = await client.get(path)
        assert response.status == 404
        assert await json_of(response) == {"error": f"no such path: {path}"}


async def test_a_huge_body_is_413_json_and_changes_nothing() -> None:
    fake = FakeControl()
    before = fake.snapshot()
    async with serve(fake) as client:
        response = await client.post("/backends/mv2/promote", data=b"x" * (MAX_BODY + 1))
        assert response.status == 413
        body = await json_of(response)
    assert str(MAX_BODY) in body["error"]
    assert fake.snapshot() == before


async def test_a_bug_in_a_handler_is_500_json_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeControl()
    fake.broken = True
    async with serve(fake) as client:
        response = await client.get("/status")
        assert response.status == 500
        body = await json_of(response)
        assert "internal error (RuntimeError)" in body["error"]
        fake.broken = False
        response = await client.get("/status")
        assert response.status == 200
        assert (await json_of(response))["primary"] == "mv1"
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "GET /status failed" in failures[0].getMessage()


# --------------------------------------------------------------------------- token


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": "Bearer wrong"}, 403),
        ({"Authorization": f"Bearer {TOKEN}x"}, 403),
        ({"Authorization": f"Bearer {TOKEN}"}, 200),
        ({"Authorization": f"bearer {TOKEN}"}, 200),
    ],
)
async def test_a_post_needs_the_token(headers: dict[str, str], status: int) -> None:
    fake = FakeControl()
    before = fake.snapshot()
    async with serve(fake, token=TOKEN) as client:
        response = await client.post("/backends/mv2/promote", headers=headers)
        assert response.status == status
        body = await json_of(response)
        if status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
    if status == 200:
        assert fake.primary == "mv2"
    else:
        assert set(body) == {"error"}
        assert fake.snapshot() == before


@pytest.mark.parametrize("path", ["/reload", "/drain"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 403),
        ({"Authorization": f"Bearer {TOKEN}"}, 200),
    ],
)
async def test_reload_and_drain_need_the_token(
    path: str, headers: dict[str, str], status: int
) -> None:
    fake = FakeControl()
    before = fake.snapshot()
    async with serve(fake, token=TOKEN) as client:
        response = await client.post(path, headers=headers)
        assert response.status == status
        await json_of(response)
    if status == 200:
        assert fake.snapshot() != before
    else:
        assert fake.snapshot() == before


async def test_a_get_needs_no_token() -> None:
    async with serve(FakeControl(), token=TOKEN) as client:
        assert (await client.get("/status")).status == 200
        assert (await client.get("/metrics")).status == 200


async def test_without_a_token_a_post_needs_none() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        response = await client.post("/backends/mv2/promote", headers={"Authorization": "x"})
        assert response.status == 200
    assert fake.primary == "mv2"


# --------------------------------------------------------------------------- CSRF


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "http://evil.example:{port}"},
        {"Origin": "http://127.0.0.1:1"},
        {"Origin": "https://127.0.0.1:{port}0"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
@pytest.mark.parametrize("path", ["/backends/mv2/promote", "/reload", "/drain"])
async def test_a_cross_site_post_is_refused(headers: dict[str, str], path: str) -> None:
    fake = FakeControl()
    before = fake.snapshot()
    async with serve(fake) as client:
        sent = {key: value.format(port=client.port) for key, value in headers.items()}
        response = await client.post(path, headers=sent)
        assert response.status == 403
        assert "refused" in (await json_of(response))["error"]
    assert fake.snapshot() == before


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://127.0.0.1:{port}"},
        {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
    ],
)
async def test_a_same_origin_post_is_accepted(headers: dict[str, str]) -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        sent = {key: value.format(port=client.port) for key, value in headers.items()}
        response = await client.post("/backends/mv2/promote", headers=sent)
        assert response.status == 200
    assert fake.primary == "mv2"


# --------------------------------------------------------------------------- AdminServer


async def test_admin_server_reports_its_real_port_and_stop_frees_it() -> None:
    server = AdminServer(FakeControl(), Address("127.0.0.1", 0))
    address = await server.start()
    try:
        assert address.host == "127.0.0.1"
        assert address.port != 0
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
            session.get(f"http://{address}/status") as response,
        ):
            assert response.status == 200
            assert (await response.json())["primary"] == "mv1"
    finally:
        await server.stop()
    await server.stop()  # a second stop is harmless

    async with asyncio.timeout(10):
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(address.host, address.port)
    # The port can be listened on again (SO_REUSEADDR: a finished connection may linger in
    # TIME_WAIT, but no listener may).
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((address.host, address.port))
        again.listen()


async def test_admin_server_logs_where_it_listens(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="replicaproxy.admin")
    server = AdminServer(FakeControl(), Address("127.0.0.1", 0))
    address = await server.start()
    try:
        assert f"admin API on http://{address}" in caplog.messages
    finally:
        await server.stop()


async def test_loopback_listener_refuses_a_rebound_dns_name() -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 must not reach the API."""
    from aiohttp.test_utils import TestClient, TestServer

    from replicaproxy.admin.app import make_app

    control = FakeControl()
    before = control.status()
    app = make_app(control, loopback=True)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        evil = {"Host": "evil.example:9901", "Origin": "http://evil.example:9901"}
        response = await client.post("/backends/b/promote", headers=evil)
        assert response.status == 403
        assert "DNS rebinding" in (await response.json())["error"]
        assert (await client.get("/status", headers={"Host": "evil.example"})).status == 403
        assert control.status() == before
        for host in ("127.0.0.1:9901", "localhost:9901", "[::1]:9901"):
            assert (await client.get("/status", headers={"Host": host})).status == 200
