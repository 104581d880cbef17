"""Faults: a backend behind a veth pair in a network namespace, partitioned or slowed down.

Each test makes its own namespace and veth pair on a /30 of 10.200.0.0/16 (the addresses
exist only on that pair) and deletes them afterwards. The backend runs inside the
namespace; the proxy runs in the root namespace and reaches it over the pair. A partition
is the namespace's end of the pair set down: packets vanish, nothing is refused or reset.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from support import (
    HOST,
    WAIT,
    NetNs,
    Proc,
    assert_no_crash,
    config_text,
    connect,
    log_time,
    netns,
    redis,
    redis_cli,
    require_binary,
    run_proxy,
    running,
)

#: Health checks with a probe redis must answer: a partitioned backend fails them by timeout.
INTERVAL, TIMEOUT, FALL = 0.2, 0.3, 3
HEALTH = (
    f"interval = {INTERVAL}\ntimeout = {TIMEOUT}\nfall = {FALL}\nrise = 1\n"
    'send = "PING\\r\\n"\nexpect = "+PONG"'
)
#: One check at start, the next in 30 s: the data path alone notices.
QUIET_HEALTH = "interval = 30\ntimeout = 2\nfall = 2\nrise = 1"
NS_PORT = 6379  # the namespace is empty: any port is free there


@contextlib.contextmanager
def ns_redis(ns: NetNs, tmp: Path) -> Iterator[Proc]:
    """A redis-server inside ``ns``, on ``ns.ns_ip:NS_PORT``."""
    binary = require_binary("redis-server")
    args = [binary, "--port", str(NS_PORT), "--bind", ns.ns_ip, "--save", "", "--appendonly",
            "no", "--dir", str(tmp), "--logfile", "",
            # Clients come from the root side of the pair, not loopback: let them in.
            "--protected-mode", "no"]  # fmt: skip
    with running(ns.exec(*args), name=f"redis@{ns.name}") as p:
        p.wait_for(r"Ready to accept connections")
        yield p


def sequential_sets(
    port: int,
    count: int,
    *,
    value: bytes = b"x",
    at: int = -1,
    then: Callable[[], None] | None = None,
) -> list[float]:
    """``count`` sequential ``SET k:i value`` on one session; latencies. ``then()`` after ``at``."""
    latencies: list[float] = []
    with connect(port) as s, s.makefile("rb") as replies:
        for i in range(count):
            if i == at and then is not None:
                then()
            started = time.monotonic()
            s.sendall(b"SET k:%d %s\r\n" % (i, value))
            line = replies.readline()
            assert line == b"+OK\r\n", f"request {i}: {line!r}"
            latencies.append(time.monotonic() - started)
    return latencies


def test_replica_partitioned_mid_session_ends_stale_and_the_client_is_unaffected(
    tmp_path: Path,
) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    with (
        netns("replica") as ns,
        ns_redis(ns, tmp_path / "r2"),
        redis(tmp_path / "r1", "r1") as (_, p1),
    ):
        config = config_text(
            tmp_path,
            [("r1", f"{HOST}:{p1}", "primary"), ("r2", f"{ns.ns_ip}:{NS_PORT}", "replica")],
            health=HEALTH,
        )
        with run_proxy(config) as px:
            px.proc.wait_for(r"health: r2 is up")
            cut: list[float] = []

            def partition() -> None:
                ns.link(up=False)
                cut.append(time.time())

            latencies = sequential_sets(px.port, 3000, at=500, then=partition)
            m = px.proc.wait_for(r".*replica r2 is now stale: (.*)")
            stale_after = log_time(m[0]) - cut[0]
            # The health checks see it within fall x interval + timeout (slack: a busy machine).
            assert stale_after < FALL * INTERVAL + TIMEOUT + INTERVAL + 1.5, stale_after
            # Async mode waits for no replica: not one request waited for the dead link (any
            # wait on it is a TCP retransmission, 200 ms or more, or a health timeout).
            after = latencies[500:]
            assert max(after) < 0.2, f"slowest request after the partition {max(after):.3f} s"
            assert px.states() == {"r1": "in_sync", "r2": "stale"}
            assert px.status()["primary"] == "r1"
            # New sessions are served by the primary alone.
            assert redis_cli(px.port, "GET", "k:2999") == "x"
            assert redis_cli(p1, "DBSIZE") == "3000"
            assert_no_crash(px.proc)
            print(
                f"\nMEASURED replica partitioned: 2500 requests after the cut, slowest "
                f"{max(after) * 1000:.1f} ms; stale {stale_after:.2f} s after the cut ({m[1]})"
            )


def test_primary_partitioned_is_marked_down_and_a_replica_answers_the_pending_request(
    tmp_path: Path,
) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    with (
        netns("primary") as ns,
        ns_redis(ns, tmp_path / "r1"),
        redis(tmp_path / "r2", "r2") as (_, p2),
    ):
        config = config_text(
            tmp_path,
            [("r1", f"{ns.ns_ip}:{NS_PORT}", "primary"), ("r2", f"{HOST}:{p2}", "replica")],
            health=HEALTH,
        )
        with run_proxy(config) as px:
            px.proc.wait_for(r"health: r1 is up")
            px.proc.wait_for(r"health: r2 is up")
            with connect(px.port) as s, s.makefile("rb") as replies:
                s.sendall(b"SET before 1\r\n")
                assert replies.readline() == b"+OK\r\n"
                ns.link(up=False)
                cut, cut_wall = time.monotonic(), time.time()
                # Sent into the partition: the primary never sees it, the replica answers it.
                s.sendall(b"SET during 2\r\n")
                assert replies.readline() == b"+OK\r\n"
                waited = time.monotonic() - cut
                s.sendall(b"GET during\r\n")
                assert replies.readline() == b"$1\r\n"
                assert replies.readline() == b"2\r\n"
            failover = px.proc.wait_for(r".*failover: primary r1 down")
            failover_after = log_time(failover[0]) - cut_wall
            bound = FALL * INTERVAL + TIMEOUT
            # The bound, plus one interval (a check may have just passed when the link went)
            # and slack for a busy 2-core machine.
            assert waited < bound + INTERVAL + 1.5, f"waited {waited:.2f} s, bound {bound:.2f} s"
            status = px.status()
            assert status["primary"] == "r2" and status["epoch"] == 1
            assert px.states() == {"r1": "stale", "r2": "in_sync"}
            assert redis_cli(p2, "GET", "before") == "1"
            assert_no_crash(px.proc)
            print(
                f"\nMEASURED primary partitioned: marked down and replaced {failover_after:.2f} s "
                f"after the cut, the pending request answered by the replica {waited:.2f} s "
                f"after it (bound fall x interval + timeout = {bound:.1f} s)"
            )


def test_slow_replica_overflows_its_buffer_and_is_dropped(tmp_path: Path) -> None:
    tc = require_binary("tc")
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    buffer = 64 * 1024
    rate = 1_000_000 / 8  # bytes per second through the slowed link: 1 mbit
    value = b"v" * 16 * 1024
    count = 512  # 8 MiB of input: more than socket buffers, the tbf queue and the buffer
    with (
        netns("slow") as ns,
        ns_redis(ns, tmp_path / "r2"),
        redis(tmp_path / "r1", "r1") as (_, p1),
    ):
        # Proxy-to-replica traffic leaves through the root side of the pair: slow it there.
        tbf = ["tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms"]
        subprocess.run(
            [tc, "qdisc", "add", "dev", ns.host_dev, "root", *tbf], check=True, timeout=WAIT
        )
        config = config_text(
            tmp_path,
            [("r1", f"{HOST}:{p1}", "primary"), ("r2", f"{ns.ns_ip}:{NS_PORT}", "replica")],
            extra=f"replica_buffer = {buffer}",
            health=QUIET_HEALTH,
        )
        with run_proxy(config) as px:
            px.proc.wait_for(r"health: r2 is up")
            started = time.monotonic()
            latencies = sequential_sets(px.port, count, value=value)
            took = time.monotonic() - started
            px.proc.wait_for(rf"r2 left the session: more than {buffer} bytes")
            px.proc.wait_for(r"replica r2 is now stale")
            assert px.states() == {"r1": "in_sync", "r2": "stale"}
            # The client went at the primary's pace: the replica's link would have needed
            # len(input) / rate seconds; the client took a small part of that.
            needed = count * len(value) / rate
            assert took < needed / 4, f"took {took:.1f} s; the slow link needs {needed:.0f} s"
            assert redis_cli(p1, "DBSIZE") == str(count)
            assert_no_crash(px.proc)
            print(
                f"\nMEASURED slow replica (1 mbit): {count} x 16 KiB SETs in {took:.2f} s "
                f"(the link needs {needed:.0f} s), p99 "
                f"{sorted(latencies)[int(0.99 * len(latencies))] * 1000:.1f} ms; "
                f"dropped past replica_buffer = {buffer // 1024} KiB, stale"
            )
