"""Faults: the proxy itself stops under load, cleanly (SIGTERM) or not (SIGKILL), and restarts."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from support import (
    WAIT,
    Proc,
    assert_no_crash,
    config_text,
    connect,
    redis,
    redis_cli,
    run_proxy,
)


class Writer(threading.Thread):
    """Sequential ``SET w:i i`` on one session until the proxy ends it; records the acked."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acked: list[int] = []
        self.ended: str | None = None
        self.progress = threading.Semaphore(0)

    def run(self) -> None:
        try:
            with connect(self.port) as s, s.makefile("rb") as replies:
                for i in range(1_000_000):  # the proxy ends the session long before
                    s.sendall(f"SET w:{i} {i}\r\n".encode())
                    line = replies.readline()
                    if line != b"+OK\r\n":
                        self.ended = f"reply {line!r}"
                        return
                    self.acked.append(i)
                    self.progress.release()
        except OSError as exc:
            self.ended = repr(exc)

    def wait_acked(self, n: int) -> None:
        for _ in range(n):
            assert self.progress.acquire(timeout=WAIT), f"stuck at {len(self.acked)}: {self.ended}"


def assert_on(port: int, keys: list[int]) -> None:
    """Every ``w:i`` of ``keys`` is on the redis at ``port`` with its value."""
    for lo in range(0, len(keys), 500):
        chunk = keys[lo : lo + 500]
        values = redis_cli(port, "MGET", *(f"w:{i}" for i in chunk)).split("\n")
        assert values == [str(i) for i in chunk], f"keys {chunk[0]}..{chunk[-1]}"


def test_sigterm_under_load_then_restart_keeps_the_view(tmp_path: Path) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    with redis(tmp_path / "r1", "r1") as (r1, p1), redis(tmp_path / "r2", "r2") as (r2, p2):
        config = config_text(
            tmp_path, [("r1", p1, "primary"), ("r2", p2, "replica")], extra="shutdown_grace = 1"
        )
        r1_again: Proc | None = None
        try:
            with run_proxy(config) as px:
                # Make the view worth keeping: r1 dies, r2 takes over, r1 comes back empty.
                writer = Writer(px.port)
                writer.start()
                writer.wait_acked(200)
                r1.signal(signal.SIGKILL)
                r1.wait()
                px.proc.wait_for(r"r2: took over from r1")
                px.proc.wait_for(r"health: r1 is down")
                r1_again = Proc(r1.args, name="r1-again")
                r1_again.wait_for("Ready to accept connections")
                px.proc.wait_for(r"health: r1 is up \(stays stale")
                writer.wait_acked(200)
                # SIGTERM while the client is mid-stream: after shutdown_grace its session
                # is closed (the client sees its connection end: expected).
                stopping = time.monotonic()
                px.proc.signal(signal.SIGTERM)
                assert px.proc.wait() == 0
                stopped_in = time.monotonic() - stopping
                writer.join(WAIT)
                assert writer.ended is not None
                assert_no_crash(px.proc)
            state = json.loads((tmp_path / "state.json").read_text())
            assert state["clean"] is True
            assert state["primary"] == "r2" and state["epoch"] == 1
            # Everything the client was told happened is on the primary it wrote through.
            assert_on(p2, writer.acked)

            with run_proxy(config, name="proxy-again") as px:
                px.proc.wait_for(r"names r2 as primary, not the config's r1: using the state file")
                assert not px.proc.count(r"did not stop cleanly")
                status = px.status()
                assert status["last_stop"] == "clean"
                assert status["primary"] == "r2" and status["epoch"] == 1
                assert px.states() == {"r1": "stale", "r2": "in_sync"}
                assert redis_cli(px.port, "GET", f"w:{writer.acked[-1]}") == str(writer.acked[-1])
                # The stale r1 is never promoted, even with r2 gone.
                r2.signal(signal.SIGKILL)
                r2.wait()
                px.proc.wait_for(r"primary r2 is down and no in-sync replica is up")
                assert px.status()["primary"] == "r2"
                assert px.states()["r1"] == "stale"
                assert_no_crash(px.proc)
            print(
                f"\nMEASURED SIGTERM under load: proxy exited 0 {stopped_in:.2f} s after the "
                f"signal (shutdown_grace 1 s); {len(writer.acked)} acknowledged writes all on "
                f"the primary; restart kept epoch 1, primary r2, r1 stale (not promoted when "
                f"r2 then died)"
            )
        finally:
            if r1_again is not None:
                r1_again.stop()


def test_sigkill_under_load_makes_every_replica_stale_until_marked_synced(
    tmp_path: Path,
) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    with redis(tmp_path / "r1", "r1") as (_, p1), redis(tmp_path / "r2", "r2") as (_, p2):
        config = config_text(tmp_path, [("r1", p1, "primary"), ("r2", p2, "replica")])
        with run_proxy(config) as px:
            writer = Writer(px.port)
            writer.start()
            writer.wait_acked(500)
            px.proc.signal(signal.SIGKILL)
            px.proc.wait()
            writer.join(WAIT)
            assert writer.ended is not None
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["clean"] is False, state
        assert state["epoch"] == 0
        assert_on(p1, writer.acked)

        with run_proxy(config, name="proxy-again") as px:
            px.proc.wait_for(r"ERROR .*the last run of the proxy did not stop cleanly")
            status = px.status()
            assert status["last_stop"] == "unclean"
            assert status["primary"] == "r1"
            assert status["epoch"] == 1  # r2 marked stale: a new view
            assert px.states() == {"r1": "in_sync", "r2": "stale"}
            # New sessions go on, without the stale replica.
            assert redis_cli(px.port, "SET", "after", "1") == "OK"
            # The operator copied the data over; r2 is promotable again.
            out = px.ctl("mark-synced", "r2")
            assert out.returncode == 0, out.stderr
            assert px.states() == {"r1": "in_sync", "r2": "in_sync"}
            assert px.status()["epoch"] == 2
            assert_no_crash(px.proc)
        print(
            f"\nMEASURED SIGKILL under load: {len(writer.acked)} acknowledged writes on the "
            f"primary; state.json clean=false; restart: every replica stale (epoch 1), "
            f"mark-synced brought r2 back (epoch 2)"
        )
