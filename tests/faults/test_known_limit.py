"""The known limits (DESIGN.md, README "Known limits").

Takeover needs a deterministic server: a replica whose answers differ never has its
bytes spliced into a client's stream; the session is closed instead.

Concurrent sessions are not ordered across the server.

Bytes within one session reach every backend in order, but how the server interleaves
*different* sessions is up to it, and may differ between primary and replica. Several
sessions appending their own value to one key leave a value (and replies) that depend on
that interleaving: primary and replica can end up different, and the divergence report
(log line and counter) is how an operator learns of it.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from pathlib import Path

from support import (
    WAIT,
    assert_no_crash,
    config_text,
    connect,
    digest,
    metric,
    recv_all,
    redis,
    redis_cli,
    run_proxy,
    running,
)

ROGUE = Path(__file__).parent / "rogue.py"

SESSIONS = 4
APPENDS = 20  # per session and round
ROUNDS = 50  # the race shows within a few rounds; this bounds the test if it does not


def appender(port: int, key: str, value: str, start: threading.Barrier, out: list[bytes]) -> None:
    """One session: APPENDS x ``APPEND key value``, replies read at the end, into ``out``.

    One write per command, not one for all: the sessions' commands then interleave
    finely at the primary, while the replica gets each session's input in batches
    (replica_flush): the two interleavings differ in most rounds.
    """
    with connect(port) as s:
        start.wait(WAIT)
        for _ in range(APPENDS):
            s.sendall(f"APPEND {key} {value}\r\n".encode())
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        out.append(b"".join(chunks))


def test_concurrent_sessions_can_leave_primary_and_replica_different(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with redis(tmp_path / "a", "r1") as (_, p1), redis(tmp_path / "b", "r2") as (_, p2):
        # divergence = "log": the replica stays in the sessions after its replies
        # differ, so the data can be compared at the end (with the default, "stale",
        # it would leave them, and be stale).
        config = config_text(
            tmp_path,
            [("r1", p1, "primary"), ("r2", p2, "replica")],
            extra='divergence = "log"',
        )
        with run_proxy(config) as px:
            diverged_at = None
            for round_ in range(ROUNDS):
                key = f"k:{round_}"
                start = threading.Barrier(SESSIONS)
                replies: list[bytes] = []
                # Values of different lengths: APPEND's reply (the new length) and the final
                # value both depend on the order the server ran the sessions' commands in.
                threads = [
                    threading.Thread(
                        target=appender,
                        args=(px.port, key, chr(ord("a") + n) * (n + 1), start, replies),
                        daemon=True,
                    )
                    for n in range(SESSIONS)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(WAIT)
                assert len(replies) == SESSIONS, "a session did not finish"
                # Every session saw all its APPENDs answered (by the primary).
                assert all(r.count(b"\r\n") == APPENDS for r in replies), replies
                px.proc.wait_count(r"outcome=", SESSIONS * (round_ + 1))
                primary_value = redis_cli(p1, "GET", key)
                replica_value = redis_cli(p2, "GET", key)
                assert len(primary_value) == len(replica_value) == APPENDS * 10  # 1+2+3+4
                if primary_value != replica_value:
                    diverged_at = round_
                    break
            assert diverged_at is not None, f"no divergence in {ROUNDS} rounds"
            # The data differ: same input, same sessions, another interleaving.
            assert digest(p1) != digest(p2)
            # And the proxy said so: the replies of some session differed.
            px.proc.wait_for(r"r2: output differs at offset \d+")
            deadline = time.monotonic() + WAIT
            while (count := metric(px.admin, 'replicaproxy_divergences_total{backend="r2"}')) < 1:
                assert time.monotonic() < deadline, "no divergence counted"
            # With divergence = "log" the replica stays in sync: the report is the only
            # sign. The default, "stale", takes it out of the promotable set.
            assert px.states() == {"r1": "in_sync", "r2": "in_sync"}
            assert_no_crash(px.proc)
            print(
                f"\nMEASURED known limit: primary and replica diverged in round "
                f"{diverged_at + 1} of at most {ROUNDS} ({SESSIONS} sessions x {APPENDS} "
                f"APPENDs); {count:.0f} divergences counted for r2"
            )


def test_a_replica_that_answers_differently_never_takes_a_session_over(tmp_path: Path) -> None:
    with (
        redis(tmp_path, "r1") as (r1, p1),
        running([sys.executable, str(ROGUE), "garbage"], name="odd") as odd,
    ):
        p_odd = int(odd.wait_for(r"listening on [\d.]+:(\d+)")[1])
        config = config_text(tmp_path, [("r1", p1, "primary"), ("odd", p_odd, "replica")])
        with run_proxy(config) as px, connect(px.port) as s:
            s.sendall(b"SET k v\r\n")
            assert s.recv(64) == b"+OK\r\n"
            px.proc.wait_for(r"odd: output differs at offset 0: primary 2b 4f 4b")
            r1.signal(signal.SIGKILL)
            r1.wait()
            # The primary is gone and the only replica's answers differ: the session ends.
            # The client never gets one byte of the replica's (different) output.
            try:
                s.sendall(b"GET k\r\n")
                rest = recv_all(s, timeout=10)
            except (ConnectionResetError, BrokenPipeError):
                rest = b""
            assert rest == b"", rest
            assert not px.proc.count(r"odd: took over")
            assert_no_crash(px.proc)
