"""Tier 2: protocol = "resp" with real Redis servers and real clients (redis-py, redis-cli).

Two Redis processes answer the same commands differently wherever the answer holds
a process's own state (a connection counter, a hash seed, a clock): these tests
check that such answers neither stop replication nor a takeover, and that real
differences still make a replica stale.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from redis.backoff import NoBackoff
from redis.retry import Retry

from support import (
    HOST,
    WAIT,
    LoopbackServer,
    Proc,
    Proxy,
    config_text,
    connect,
    redis,
    redis_cli,
    require_binary,
    run_proxy,
)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def two_redis(tmp_path: Path) -> Iterator[tuple[Proc, int, Proc, int]]:
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    with (
        redis(tmp_path / "p", "primary") as (p, pport),
        redis(tmp_path / "r", "replica") as (
            r,
            rport,
        ),
    ):
        yield p, pport, r, rport


@contextlib.contextmanager
def resp_proxy(
    tmp_path: Path, pport: int, rport: int, *, mode: str = "async", extra: str = "",
    health: str = "",
) -> Iterator[Proxy]:  # fmt: skip
    config = config_text(
        tmp_path,
        [("primary", pport, "primary"), ("replica", rport, "replica")],
        extra=f'mode = "{mode}"\nprotocol = "resp"\n{extra}',
        health=health,
    )
    with run_proxy(config) as px:
        yield px


def client(port: int, *, protocol: int = 3) -> Any:
    """One connection, never retried: an error would reach the test, not a reconnect."""
    return redis_py.Redis(
        host=HOST,
        port=port,
        protocol=protocol,
        single_connection_client=True,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=WAIT,
        decode_responses=True,
    )


def backend(px: Proxy, name: str) -> dict[str, Any]:
    [b] = [b for b in px.status()["backends"] if b["name"] == name]
    return dict(b)


def wait_until(what: str, check: object, timeout: float = WAIT) -> None:
    """Wait (bounded) until ``check()`` is true."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


# ------------------------------------------------------- harmless differences


def _nondeterministic_commands(r: Any) -> None:
    """Every command of the issue whose reply differs between two honest servers."""
    r.sadd("bigset", *[f"member:{i}" for i in range(200)])  # hashtable, past 128
    r.hset("bighash", mapping={f"field:{i}": i for i in range(600)})  # past 512 fields
    r.set("ttl-key", "v", ex=1000)
    r.info()
    r.time()
    r.client_id()
    r.client_list()
    # (redis-py's own parser of COMMAND DOCS fails on RESP3: read the raw reply.)
    r.connection.send_command("COMMAND", "DOCS")
    assert r.connection.read_response()
    r.config_get("port")
    r.execute_command("HELLO", "3")
    assert len(r.smembers("bigset")) == 200
    assert "bigset" in r.keys("*")
    assert len(r.hgetall("bighash")) == 600
    assert len(r.hkeys("bighash")) == 600
    assert len(set(r.scan_iter(count=2))) >= 3  # cursors are each server's own
    assert len(set(r.sscan_iter("bigset", count=10))) == 200
    r.srandmember("bigset", 3)
    r.randomkey()
    r.ttl("ttl-key")
    r.pttl("ttl-key")
    r.object("encoding", "bigset")
    r.memory_usage("bigset")
    r.lastsave()
    r.execute_command("ROLE")


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_redis_py_survives_kill_9_of_the_primary_after_every_harmless_difference(
    tmp_path: Path, mode: str
) -> None:
    require_binary("redis-server")
    with (
        two_redis(tmp_path) as (primary, pport, _replica, rport),
        resp_proxy(tmp_path, pport, rport, mode=mode) as px,
    ):
        r = client(px.port)  # redis-py 8 sends HELLO 3 on connect
        r.ping()
        sock = r.connection._sock
        _nondeterministic_commands(r)
        assert backend(px, "replica")["divergences"] == 0
        assert backend(px, "replica")["allowed_differences"] > 0, "the differences were there"
        assert px.states() == {"primary": "in_sync", "replica": "in_sync"}
        for i in range(400):
            if i == 200:
                primary.signal(signal.SIGKILL)
                primary.wait()
            r.set(f"k:{i}", f"value:{i}")
            assert r.get(f"k:{i}") == f"value:{i}"
        assert r.connection._sock is sock, "the same connection, never reconnected"
        px.proc.wait_for(r"took over from primary")
        status = px.status()
        assert status["primary"] == "replica"
        assert backend(px, "replica")["divergences"] == 0
        values = redis_cli(rport, "MGET", *[f"k:{i}" for i in range(400)]).split("\n")
        assert values == [f"value:{i}" for i in range(400)]
        r.close()


def test_a_write_with_a_random_result_is_a_real_divergence(tmp_path: Path) -> None:
    with two_redis(tmp_path) as (_p, pport, _r, rport), resp_proxy(tmp_path, pport, rport) as px:
        r = client(px.port)
        r.sadd("s", *range(100))
        r.smembers("s")
        popped = r.spop("s", 10)  # each server pops its own: their data now differ
        assert len(popped) == 10
        px.proc.wait_for(r"reply \d+ to SPOP differs")
        wait_until("the replica is stale", lambda: px.states()["replica"] == "stale")
        r.close()


# ------------------------------------------------------------- redis-cli


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_redis_cli_piping_4000_sets_loses_none_when_the_primary_dies(
    tmp_path: Path, mode: str
) -> None:
    cli = require_binary("redis-cli")
    seed = int.from_bytes(os.urandom(4), "big")
    kill_after = random.Random(seed).randint(100, 3500)
    print(f"seed {seed}: the primary is killed once it has {kill_after} keys")
    script = tmp_path / "sets.txt"
    script.write_text("".join(f"SET key:{i} value:{i}\n" for i in range(4000)))
    with (
        two_redis(tmp_path) as (primary, pport, _r, rport),
        resp_proxy(tmp_path, pport, rport, mode=mode) as px,
    ):
        with script.open("rb") as stdin:
            run = subprocess.Popen(
                [cli, "-h", HOST, "-p", str(px.port)],
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                wait_until(
                    f"{kill_after} keys on the primary",
                    lambda: int(redis_cli(pport, "DBSIZE")) >= kill_after,
                )
                primary.signal(signal.SIGKILL)
                out, err = run.communicate(timeout=60)
            finally:
                if run.poll() is None:
                    run.kill()
                    run.wait()
        assert run.returncode == 0, err
        replies = out.decode().split()
        assert replies.count("OK") == 4000, (len(replies), replies[-5:], err)
        assert px.status()["primary"] == "replica"
        assert int(redis_cli(rport, "DBSIZE")) == 4000
        values = redis_cli(rport, "MGET", *[f"key:{i}" for i in range(0, 4000, 7)]).split("\n")
        assert values == [f"value:{i}" for i in range(0, 4000, 7)]
        assert backend(px, "replica")["divergences"] == 0


# ------------------------------------------------- who ended the session


def test_an_idle_connection_is_taken_over_when_its_primary_dies(tmp_path: Path) -> None:
    with (
        two_redis(tmp_path) as (primary, pport, _r, rport),
        resp_proxy(tmp_path, pport, rport, health="interval = 30\ntimeout = 1") as px,
    ):
        # (Health checks every 30 s: the session itself notices the primary's FIN.)
        r = client(px.port)
        r.set("a", "1")
        sock = r.connection._sock
        primary.signal(signal.SIGKILL)
        primary.wait()
        px.proc.wait_for(r"took over from primary")
        assert r.get("a") == "1"
        assert r.connection._sock is sock
        assert px.status()["primary"] == "replica"
        r.close()
        px.proc.wait_for(r"outcome=takeover")


def _send_too_big_inline_request(port: int) -> bytes:
    """What the server answers a too-big inline request, read as Redis's own test
    suite reads it: input goes on until a write fails, then the answer is read."""
    with connect(port) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(100) == b"+PONG\r\n"
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(1000):  # no newline: past Redis's 64 KiB inline limit
                s.sendall(b"x" * 1024)
        got = b""
        with contextlib.suppress(ConnectionResetError):  # (what came before it counts)
            while chunk := s.recv(65536):
                got += chunk
        return got


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_server_closing_one_session_fails_nobody_over(tmp_path: Path, mode: str) -> None:
    with (
        two_redis(tmp_path) as (_p, pport, _r, rport),
        resp_proxy(tmp_path, pport, rport, mode=mode) as px,
    ):
        for _ in range(20):
            got = _send_too_big_inline_request(px.port)
            assert got == b"-ERR Protocol error: too big inline request\r\n", got
        # CLIENT KILL of the session itself, on both servers.
        r = client(px.port, protocol=2)
        with pytest.raises(redis_py.ConnectionError):
            r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no")
            r.ping()
        r.close()
        # CLIENT KILL ID: the primary's id for this session, which the replica does not have.
        r = client(px.port, protocol=2)
        own = r.client_id()
        with contextlib.suppress(redis_py.ConnectionError, redis_py.ResponseError):
            r.execute_command("CLIENT", "KILL", "ID", own)
            r.ping()
        r.close()
        px.proc.wait_for(r"outcome=server_closed")
        r = client(px.port)
        assert r.ping()
        r.close()
        status = px.status()
        assert status["epoch"] == 0 and status["primary"] == "primary"
        assert px.states() == {"primary": "in_sync", "replica": "in_sync"}
        assert backend(px, "replica")["divergences"] == 0
        assert not px.proc.count(r"failover|took over")


# -------------------------------------------------- staleness that cannot be missed


class RefusingServer(LoopbackServer):
    """A server that reads a connection's first request, answers an error and closes
    it: a replica that refuses the login the primary accepted (PostgreSQL with a SCRAM
    login is one). ``refused`` is set once it did."""

    def __init__(self) -> None:
        self.refused = threading.Event()
        super().__init__(self._refuse)

    def _refuse(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            if conn.recv(100):  # (not a health check)
                conn.sendall(b"-ERR authentication failed\r\n")
                conn.shutdown(socket.SHUT_RDWR)
                self.refused.set()


@pytest.mark.parametrize(("protocol", "divergence"), [("resp", "stale"), ("bytes", "log")])
def test_a_replica_that_refuses_and_closes_is_stale_every_time(
    tmp_path: Path, protocol: str, divergence: str
) -> None:
    (tmp_path / "p").mkdir()
    refusing = RefusingServer()
    try:
        with redis(tmp_path / "p", "primary") as (_p, pport):
            config = config_text(
                tmp_path,
                [("primary", pport, "primary"), ("replica", refusing.port, "replica")],
                extra=f'protocol = "{protocol}"\ndivergence = "{divergence}"',
                health="interval = 30\ntimeout = 1",
            )
            stale = 0
            with run_proxy(config) as px:
                for i in range(20):
                    refusing.refused.clear()
                    with connect(px.port) as s:
                        s.sendall(b"PING\r\n")  # the "login": the primary takes it
                        assert s.recv(100) == b"+PONG\r\n"
                        assert refusing.refused.wait(WAIT)  # the replica did not
                        for j in range(5):
                            s.sendall(b"SET k%d %d\r\n" % (j, i))
                            assert s.recv(100) == b"+OK\r\n"
                    wait_until("the session is over", lambda: px.status()["sessions_active"] == 0)
                    if px.states()["replica"] == "stale":
                        stale += 1
                        assert px.ctl("mark-synced", "replica").returncode == 0
            assert stale == 20
    finally:
        refusing.close()


def test_divergences_are_all_counted_in_the_log_within_five_seconds(tmp_path: Path) -> None:
    with (
        two_redis(tmp_path) as (_p, pport, _r, rport),
        resp_proxy(tmp_path, pport, rport, extra='divergence = "log"') as px,
    ):
        for i in range(10):
            r = client(px.port, protocol=2)
            r.sadd(f"s{i}", *range(50))
            r.spop(f"s{i}", 5)
            r.close()
        wait_until("ten divergences", lambda: backend(px, "replica")["divergences"] == 10)
        # One line, then one that says how many more came, within 5 s and unprompted.
        px.proc.wait_for(r"more like this in the last 5 s", timeout=7)
        lines = [line for line in px.proc.lines if re.search(r"replica: reply \d+ to SPOP", line)]
        summaries = [re.search(r"(\d+) more like this", line) for line in lines]
        held = sum(int(m[1]) for m in summaries if m)
        one_by_one = sum(1 for m in summaries if not m)
        assert one_by_one + held == 10, lines
        assert all(
            "the last: session" in line for line, m in zip(lines, summaries, strict=True) if m
        )
