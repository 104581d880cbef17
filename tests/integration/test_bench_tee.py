"""bench/tee.py, the benchmark's reference forwarder, moves the bytes it claims to.

Its numbers stand beside replicaproxy's in bench/results as the least the same I/O
costs; they mean that only if it really writes every client byte to the primary and,
on its tick, to the replica.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from support import WAIT, connect, echo_round_trip, free_port, running, sink

TEE = Path(__file__).parents[2] / "bench" / "tee.py"


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            connect(port, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_the_reference_tee_gives_the_replica_every_byte_on_its_tick() -> None:
    port = free_port()
    with (
        sink("primary", echo=True) as (primary, p_port),
        sink("replica") as (replica, r_port),
        running(
            [sys.executable, str(TEE), str(port), str(p_port), str(r_port), "--flush", "50"],
            name="tee",
        ),
    ):
        wait_listening(port)
        chunks = [os.urandom(n) for n in (1, 100, 70_000, 5, 300_000)]
        with connect(port) as s:
            for chunk in chunks:
                echo_round_trip(s, chunk)  # the primary's answer comes straight back
        stream = b"".join(chunks)
        line = rf"conn {len(stream)} {hashlib.sha256(stream).hexdigest()} eof"
        primary.wait_for(line)
        replica.wait_for(line)
