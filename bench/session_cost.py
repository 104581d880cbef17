"""What comparing replies by message costs a session, without I/O: ns per request.

``python bench/session_cost.py [--sessions 50] [--rounds 400]`` makes that many
sessions (one primary, one replica) of each protocol, ``bytes`` and ``resp``, in
each mode, and hands each session, over and over, what a `redis-benchmark -P 16`
connection makes it see: 16 pipelined SETs (or GETs) from the client, the primary's
16 replies, then the replica's. The sessions take turns, as a proxy's do, so that
each one's state has left the cache by its next turn. The two protocols take
turns, run after run; the table gives the best of seven runs of each in ns per
request, and resp over bytes.

No kernel and no other process take part: this is for seeing what a change to a
framer or to the session costs, to within 10-15% on a small shared machine (where
``run.py``'s CPU per request moves by 15-30%). It leaves out the driver (whose fast
paths pass most data without ``Session.handle``), the event loop and the system
calls, which make most of the proxy's CPU per request (``bench/README.md``, "Where
the time goes").
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Literal

from replicaproxy import compiled
from replicaproxy.core.events import ClientData, UpstreamConnected, UpstreamData
from replicaproxy.core.framing import Framing
from replicaproxy.core.resp import RespFraming, RespRules
from replicaproxy.core.session import Limits, Member, Session

PIPELINE = 16
RUNS = 7


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


#: (name, the client's requests, each server's replies), as redis-benchmark sends them.
WORKLOADS = [
    ("SET", command(b"SET", b"key:__rand_int__", b"xxx") * PIPELINE, b"+OK\r\n" * PIPELINE),
    ("GET", command(b"GET", b"key:__rand_int__") * PIPELINE, b"$3\r\nxxx\r\n" * PIPELINE),
]


Mode = Literal["async", "sync"]


def sessions(count: int, mode: Mode, framing: Callable[[], Framing | None]) -> list[Session]:
    made = []
    for _ in range(count):
        s = Session(
            [Member("primary", "primary"), Member("replica", "replica")],
            Limits(mode=mode),
            framing(),
        )
        s.start()
        s.handle(UpstreamConnected("primary"))
        s.handle(UpstreamConnected("replica"))
        made.append(s)
    return made


def one_run(
    count: int,
    rounds: int,
    mode: Mode,
    framing: Callable[[], Framing | None],
    requests: bytes,
    replies: bytes,
) -> float:
    """ns per request in one run; it checks that every reply reached the client."""
    ss = sessions(count, mode, framing)
    began = time.perf_counter_ns()
    for _ in range(rounds):
        for s in ss:
            s.handle(ClientData(requests))
            s.handle(UpstreamData("primary", replies))
            s.handle(UpstreamData("replica", replies))
    took = time.perf_counter_ns() - began
    for s in ss:
        if s.delivered != rounds * len(replies) or not s.matched("replica"):
            raise SystemExit(f"a {mode} session went wrong: delivered {s.delivered}")
    return took / (rounds * count * PIPELINE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50, help="sessions (default 50)")
    parser.add_argument("--rounds", type=int, default=400, help="turns each (default 400)")
    args = parser.parse_args(argv)
    for flag, value in (("--sessions", args.sessions), ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{flag}: {value} is fewer than 1")
    rules = RespRules()
    framings: dict[str, Callable[[], Framing | None]] = {
        "bytes": lambda: None,
        "resp": lambda: RespFraming(rules),
    }
    print(
        f"Session.handle, {args.sessions} sessions, {PIPELINE} requests pipelined, "
        f"{args.rounds} turns each, best of {RUNS} ({compiled.data_path()}):\n"
    )
    print("| mode | requests | bytes ns/req | resp ns/req | resp / bytes |")
    print("|---|---|---|---|---|")
    modes: tuple[Mode, ...] = ("async", "sync")
    for mode in modes:
        for name, requests, replies in WORKLOADS:
            # The protocols take turns, run after run: what the machine does meanwhile
            # falls on both alike, and the best run of each is the least disturbed.
            cost = dict.fromkeys(framings, float("inf"))
            for _ in range(RUNS):
                for protocol, framing in framings.items():
                    took = one_run(args.sessions, args.rounds, mode, framing, requests, replies)
                    cost[protocol] = min(cost[protocol], took)
            print(
                f"| {mode} | {name} | {cost['bytes']:.0f} | {cost['resp']:.0f} "
                f"| {cost['resp'] / cost['bytes']:.2f}x |"
            )


if __name__ == "__main__":
    main()
