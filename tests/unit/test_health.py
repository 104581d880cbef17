"""Tier 1: health-check counting (fall / rise), and one probe on loopback."""

from __future__ import annotations

import asyncio

from replicaproxy.config import Address, HealthConfig
from replicaproxy.health import HealthState, probe


def test_first_success_is_up_then_fall_failures_are_down_then_rise_successes_up() -> None:
    s = HealthState(fall=3, rise=2)
    assert s.health == "unknown"
    assert s.record(True) == "up"
    assert s.record(False) is None
    assert s.record(False) is None
    assert s.record(False) == "down"
    assert s.record(False) is None
    assert s.record(True) is None, "one success is not enough to come back"
    assert s.record(False) is None
    assert s.record(True) is None
    assert s.record(True) == "up"


def test_unknown_goes_down_after_fall_failures() -> None:
    s = HealthState(fall=2, rise=5)
    assert s.record(False) is None
    assert s.record(False) == "down"


async def test_probe_send_expect() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if await r.readexactly(6) == b"PING\r\n":
            w.write(b"+PONG\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    addr = Address("127.0.0.1", port)
    try:
        good = HealthConfig(timeout=2.0, send=b"PING\r\n", expect=b"PONG")
        assert await probe(addr, good) is None
        bad = HealthConfig(timeout=2.0, send=b"PING\r\n", expect=b"NOPE")
        assert await probe(addr, bad) == "closed before sending b'NOPE'"
    finally:
        server.close()
        await server.wait_closed()
    refused = await probe(addr, HealthConfig(timeout=1.0))
    assert refused is not None and "refused" in refused.lower()
