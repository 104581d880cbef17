"""Faults: the primary is SIGKILLed under load, in async and in sync mode."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import (
    HOST,
    WAIT,
    assert_no_crash,
    config_text,
    connect,
    redis,
    redis_cli,
    require_binary,
    run_proxy,
)

#: Requests of the sequential client after the kill: enough to be served well past it.
AFTER_KILL = 300


class SequentialWriter(threading.Thread):
    """``SET key:i i`` one at a time on one session; remembers what was acknowledged."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acked: list[int] = []
        self.latencies: list[float] = []
        self.error: str | None = None
        self.killed_at: int | None = None  # len(acked) when the primary was killed
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with connect(self.port) as s, s.makefile("rb") as replies:
                for i in range(100_000):
                    if (
                        self.killed_at is not None
                        and len(self.acked) >= self.killed_at + AFTER_KILL
                    ):
                        return
                    started = time.monotonic()
                    s.sendall(f"SET key:{i} {i}\r\n".encode())
                    line = replies.readline()
                    if line != b"+OK\r\n":
                        self.error = f"request {i}: {line!r}"
                        return
                    self.latencies.append(time.monotonic() - started)
                    self.acked.append(i)
                self.error = "never told the primary was killed"
        except OSError as exc:
            self.error = f"after {len(self.acked)} acknowledged: {exc!r}"
        finally:
            self.done.set()


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_primary_sigkilled_under_redis_benchmark_load(tmp_path: Path, mode: str) -> None:
    bench = require_binary("redis-benchmark")
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    with redis(tmp_path / "r1", "r1") as (r1, p1), redis(tmp_path / "r2", "r2") as (_, p2):
        config = config_text(
            tmp_path, [("r1", p1, "primary"), ("r2", p2, "replica")], extra=f'mode = "{mode}"'
        )
        with run_proxy(config) as px:
            # SET only: +OK whatever the interleaving of the 50 sessions, so the replica's
            # replies compare equal to the primary's and every session can be taken over.
            run = subprocess.Popen(
                [bench, "-h", HOST, "-p", str(px.port), "-t", "set", "-n", "40000", "-c", "50",
                 "-r", "100000", "-q"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            writer = SequentialWriter(px.port)
            writer.start()
            try:
                deadline = time.monotonic() + WAIT
                while int(redis_cli(p1, "DBSIZE")) < 3000 or len(writer.acked) < 200:
                    assert run.poll() is None, run.communicate()
                    assert not writer.done.is_set(), writer.error
                    assert time.monotonic() < deadline, "no progress before the kill"
                writer.killed_at = len(writer.acked)
                killed = time.monotonic()
                r1.signal(signal.SIGKILL)
                out, err = run.communicate(timeout=120)
                assert writer.done.wait(60), "the sequential client did not finish"
            finally:
                if run.poll() is None:
                    run.kill()
                    run.wait()
                writer.killed_at = writer.killed_at or 0
                writer.done.wait(WAIT)
            # redis-benchmark exits 1 on any connection error: 0 means none of its 50
            # clients saw the primary die.
            assert run.returncode == 0, out + err
            assert writer.error is None, writer.error
            assert len(writer.acked) == writer.killed_at + AFTER_KILL
            px.proc.wait_for(r"r2: took over from r1")
            assert px.status()["primary"] == "r2"
            assert px.states()["r1"] == "stale"
            # Every write the sequential client was told about is on the replica: it got the
            # same input (async), or produced the same reply first (sync).
            for lo in range(0, len(writer.acked), 500):
                chunk = writer.acked[lo : lo + 500]
                values = redis_cli(p2, "MGET", *(f"key:{i}" for i in chunk)).split("\n")
                assert values == [str(i) for i in chunk], f"keys {chunk[0]}..{chunk[-1]}"
            assert_no_crash(px.proc)
            rps = out.strip().splitlines()[-1] if out.strip() else "?"
            around = writer.latencies[writer.killed_at - 5 : writer.killed_at + 20]
            print(
                f"\nMEASURED primary killed ({mode}): redis-benchmark exit 0 ({rps.strip()}); "
                f"{len(writer.acked)} sequential SETs acknowledged, all on the replica; "
                f"slowest request around the kill {max(around) * 1000:.0f} ms; "
                f"run took {time.monotonic() - killed:.1f} s after the kill"
            )
