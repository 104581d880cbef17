"""Tier 2: the primary dies mid-session and the client does not notice."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from replicaproxy.demo.protocol import EXPECTED_LINES
from support import (
    HOST,
    WAIT,
    config_text,
    connect,
    example_client,
    example_server,
    redis,
    redis_cli,
    require_binary,
    run_proxy,
    running,
    sink,
)

CRASHING_SERVER = Path(__file__).parent / "crashing_server.py"


def two_redis(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    return tmp_path / "r1", tmp_path / "r2"


def test_redis_benchmark_does_not_notice_the_primary_dying(tmp_path: Path) -> None:
    bench = require_binary("redis-benchmark")
    d1, d2 = two_redis(tmp_path)
    with redis(d1, "r1") as (r1, p1), redis(d2, "r2") as (_, p2):
        config = config_text(tmp_path, [("r1", p1, "primary"), ("r2", p2, "replica")])
        with run_proxy(config) as px:
            # SET answers +OK whatever the order of sessions: replies compare equal.
            run = subprocess.Popen(
                [bench, "-h", HOST, "-p", str(px.port), "-t", "set", "-n", "60000", "-c", "50",
                 "-r", "100000", "-q"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + WAIT
                while int(redis_cli(p1, "DBSIZE")) < 3000:  # well under way
                    assert run.poll() is None, run.communicate()
                    assert time.monotonic() < deadline, "the benchmark made no progress"
                r1.signal(signal.SIGKILL)
                out, err = run.communicate(timeout=120)
            finally:
                if run.poll() is None:
                    run.kill()
                    run.wait()
            # redis-benchmark exits 1 on any connection error: 0 means no client noticed.
            assert run.returncode == 0, out + err
            assert "requests per second" in out
            px.proc.wait_for(r"r2: took over from r1")
            assert px.status()["primary"] == "r2"
            assert px.states()["r1"] == "stale"


def test_example_server_crashing_after_its_reply(tmp_path: Path) -> None:
    with (
        running([sys.executable, str(CRASHING_SERVER)], name="crashing") as crashing,
        example_server("replica") as (replica, r_port),
    ):
        c_port = int(crashing.wait_for(r"listening on [\d.]+:(\d+)")[1])
        backends = [("crashing", c_port, "primary"), ("replica", r_port, "replica")]
        config = config_text(tmp_path, backends)
        with run_proxy(config) as px:
            # The classroom client finishes normally: the replica answered the rest.
            assert example_client(px.port) == "HOLA"
            assert crashing.wait() == 1
            assert replica.wait_stdout_lines(8) == list(EXPECTED_LINES)
            # Either the replica took over after the 4 bytes the client already has (the
            # client's next 40 bytes met the dead primary's reset first), or it closed
            # after them as the protocol says, where the primary had: then the session
            # ended as the server ends it, and the health checks fail the primary over.
            m = px.proc.wait_for(r"outcome=(takeover|server_closed)")
            if m[1] == "takeover":
                px.proc.wait_for(r"replica: took over from crashing at offset 4")
                px.proc.wait_for(r"outcome=takeover promoted=replica takeovers=1")
            px.proc.wait_for(r"replica is the primary now")
            assert example_client(px.port) == "HOLA"
            assert px.status()["primary"] == "replica"


@pytest.mark.parametrize("seed", range(20))
def test_sync_mode_loses_no_acknowledged_write(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    kill_after = rng.randint(1, 300)
    more = 200
    d1, d2 = two_redis(tmp_path)
    with redis(d1, "r1") as (r1, p1), redis(d2, "r2") as (_, p2):
        config = config_text(
            tmp_path, [("r1", p1, "primary"), ("r2", p2, "replica")], extra='mode = "sync"'
        )
        with run_proxy(config) as px:
            acked: list[int] = []
            reached = threading.Event()

            # The kill comes from another thread, at whatever point the stream is.
            def kill_when_reached() -> None:
                if reached.wait(WAIT):
                    r1.signal(signal.SIGKILL)

            killer = threading.Thread(target=kill_when_reached, daemon=True)
            killer.start()
            with connect(px.port) as s, s.makefile("rb") as replies:
                for i in range(kill_after + more):
                    try:
                        s.sendall(f"SET key:{i} {i}\r\n".encode())
                        line = replies.readline()
                    except OSError:
                        break
                    if line != b"+OK\r\n":
                        break
                    acked.append(i)
                    if len(acked) == kill_after:
                        reached.set()
            killer.join(WAIT)
            r1.wait()
            # Every acknowledged SET is on the replica, read straight from it.
            for lo in range(0, len(acked), 100):
                keys = [f"key:{i}" for i in acked[lo : lo + 100]]
                values = redis_cli(p2, "MGET", *keys).split("\n")
                assert values == [str(i) for i in acked[lo : lo + 100]]
            # And the client never saw an error: the replica took the session over.
            assert len(acked) == kill_after + more, "\n".join(px.proc.lines[-15:])


def test_sigstopped_primary_is_replaced_and_the_pending_reply_comes(tmp_path: Path) -> None:
    d1, d2 = two_redis(tmp_path)
    interval, timeout, fall = 0.2, 0.3, 3
    with redis(d1, "r1") as (r1, p1), redis(d2, "r2") as (_, p2):
        config = config_text(
            tmp_path,
            [("r1", p1, "primary"), ("r2", p2, "replica")],
            health=f"interval = {interval}\ntimeout = {timeout}\nfall = {fall}\nrise = 2\n"
            'send = "PING\\r\\n"\nexpect = "+PONG"',
        )
        with run_proxy(config) as px:
            px.proc.wait_for(r"health: r2 is up")
            with connect(px.port) as s, s.makefile("rb") as replies:
                s.sendall(b"SET before 1\r\n")
                assert replies.readline() == b"+OK\r\n"
                r1.signal(signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    s.sendall(b"SET during 2\r\n")
                    assert replies.readline() == b"+OK\r\n"
                    waited = time.monotonic() - started
                    s.sendall(b"GET during\r\n")
                    assert replies.readline() == b"$1\r\n"
                    assert replies.readline() == b"2\r\n"
                finally:
                    r1.signal(signal.SIGCONT)
            bound = fall * interval + timeout
            # The bound, plus one interval (the check in flight) and slack for a busy machine.
            assert waited < bound + interval + 1.5, f"waited {waited:.2f} s, bound {bound:.2f} s"
            px.proc.wait_for(r"r2: took over from r1 at offset \d+: r1 marked down")
            assert redis_cli(p2, "GET", "before") == "1"


def test_shadow_that_answers_differently_is_reported_and_changes_nothing(
    tmp_path: Path,
) -> None:
    with (
        example_server("primary") as (primary, p_port),
        sink("shadow", echo=True) as (_, s_port),  # echoes instead of answering HOLA
    ):
        config = config_text(
            tmp_path, [("primary", p_port, "primary"), ("shadow", s_port, "shadow")]
        )
        with run_proxy(config) as px:
            assert example_client(px.port) == "HOLA"
            assert primary.wait_stdout_lines(8) == list(EXPECTED_LINES)
            px.proc.wait_for(r"shadow: output differs at offset 0: primary 48 4f 4c 41")
            with urllib.request.urlopen(f"http://{px.admin}/metrics", timeout=WAIT) as r:
                metrics = r.read().decode()
            assert 'replicaproxy_divergences_total{backend="shadow"} 1.0' in metrics
            status = px.status()
            assert status["primary"] == "primary" and status["epoch"] == 0
            assert {b["name"]: b["role"] for b in status["backends"]}["shadow"] == "shadow"
            assert example_client(px.port) == "HOLA"
