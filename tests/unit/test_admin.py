"""The admin HTTP API against an in-memory Control (aiohttp test server on loopback)."""

from __future__ import annotations

import asyncio
import logging
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
from replicaproxy.admin.app import MAX_BODY
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


async def test_status_is_the_controls_status_with_the_documented_keys() -> None:
    fake = FakeControl()
    async with serve(fake) as client:
        response = await client.get("/status")
        assert response.status == 200
        body = await json_of(response)
    assert body == fake.status()
    assert set(body) == {"epoch", "primary", "mode", "backends"}
    assert [b["name"] for b in body["backends"]] == ["mv1", "mv2", "mv3", "canary"]
    for backend in body["backends"]:
        assert set(backend) == {"name", "address", "role", "state", "health", "sessions"}


async def test_metrics_is_prometheus_text_from_the_registry() -> None:
    async with serve(FakeControl()) as client:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    assert f"{METRIC} 3.0" in text.splitlines()


async def test_index_links_to_status_and_metrics() -> None:
    async with serve(FakeControl()) as client:
        response = await client.get("/")
        assert response.status == 200
        assert response.content_type == "text/html"
        html = await response.text()
    assert 'href="/status"' in html
    assert 'href="/metrics"' in html


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
async def test_a_cross_site_post_is_refused(headers: dict[str, str]) -> None:
    fake = FakeControl()
    before = fake.snapshot()
    async with serve(fake) as client:
        sent = {key: value.format(port=client.port) for key, value in headers.items()}
        response = await client.post("/backends/mv2/promote", headers=sent)
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
