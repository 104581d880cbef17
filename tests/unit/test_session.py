"""Tier 1: the session core driven by plain events (no sockets)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicaproxy.core.events import (
    CLIENT,
    Abort,
    Action,
    BackendStale,
    CheckPrimary,
    ClientClosed,
    ClientData,
    ClientEof,
    Close,
    Connect,
    Event,
    Finished,
    MarkStale,
    OverMemory,
    PauseReading,
    PrimaryChecked,
    PrimaryDown,
    Promote,
    PromoteResult,
    Report,
    ResumeReading,
    Shutdown,
    StartTimer,
    Timer,
    TimerFired,
    UpstreamClosed,
    UpstreamConnected,
    UpstreamConnectFailed,
    UpstreamData,
    UpstreamEof,
    Write,
    WriteAll,
    WriteBlocked,
    WriteEof,
    WriteUnblocked,
)
from replicaproxy.core.framing import Framing
from replicaproxy.core.session import Limits, Member, Session, _same

P, R, S = "p", "r", "s"


@dataclass
class Harness:
    """Feeds events to a session and records what each endpoint was sent."""

    session: Session
    #: Data events the driver's way: by the plan that route() and passes() gave
    #: after the last handle() (only counted, settled before the next handle), or
    #: by passed() and checked(); handle() only for what they leave.
    hot: bool = False
    actions: list[Action] = field(default_factory=list)
    written: dict[str, bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    eof_sent: dict[str, int] = field(default_factory=dict)  # target -> bytes written before EOF
    route: tuple[str, ...] | None = None
    frames: bool = False
    answered: list[str] = field(default_factory=list)  # CheckPrimary answered so far
    out_name: str | None = None
    counted_in: int = 0
    counted_out: int = 0

    def record(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            writes = [(t, a.data) for t in a.targets] if isinstance(a, WriteAll) else []
            if isinstance(a, Write):
                writes = [(a.target, a.data)]
            for target, data in writes:
                assert target not in self.eof_sent, f"write to {target} after its EOF"
                self.written[target] += data
            if isinstance(a, WriteEof):
                assert a.target not in self.eof_sent, f"second EOF to {a.target}"
                self.eof_sent[a.target] = len(self.written[a.target])
        self.actions += actions
        return actions

    def start(self) -> list[Action]:
        return self.record(self.session.start())

    def settle(self) -> None:
        """Give the session the counts of what went by the plan (the driver's settle)."""
        if self.counted_in:
            self.session.count_input(self.counted_in)
            self.counted_in = 0
        if self.counted_out:
            self.session.count_output(self.counted_out)
            self.counted_out = 0

    def __call__(self, event: Event) -> list[Action]:
        s = self.session
        if self.hot and type(event) is ClientData and self.route is not None:
            if self.frames:
                s.frame_input(event.data)
            self.counted_in += len(event.data)
            return self.record([WriteAll(self.route, event.data)])
        if self.hot and type(event) is UpstreamData:
            if event.name == self.out_name:
                self.counted_out += len(event.data)
                return self.record([Write(CLIENT, event.data)])
            if s.passed(event.name, event.data):
                return self.record([Write(CLIENT, event.data)])
            if s.checked(event.name, event.data):
                return self.record([])
        self.settle()
        actions = self.record(s.handle(event))
        if self.hot:
            self.route = s.route()
            self.frames = s.frames_input()
            self.out_name = s.primary if s.passes() else None
        return actions

    def of(self, kind: type[Action]) -> list[Action]:
        return [a for a in self.actions if isinstance(a, kind)]

    def writes(self) -> list[tuple[str, bytes]]:
        """Every write, as (target, data), WriteAll spelled out."""
        out: list[tuple[str, bytes]] = []
        for a in self.actions:
            if isinstance(a, Write):
                out.append((a.target, a.data))
            elif isinstance(a, WriteAll):
                out += [(t, a.data) for t in a.targets]
        return out

    def stale(self) -> set[str]:
        return {a.name for a in self.actions if isinstance(a, MarkStale)}

    def reports(self, kind: str) -> list[Report]:
        return [a for a in self.actions if isinstance(a, Report) and a.kind == kind]


def make(
    *members: tuple[str, str], hot: bool = False, framing: Framing | None = None, **limits: float
) -> Harness:
    session = Session(
        [Member(n, r) for n, r in members],  # type: ignore[arg-type]
        Limits(**limits),  # type: ignore[arg-type]
        framing,
    )
    return Harness(session, hot=hot)


def connected(
    *members: tuple[str, str], hot: bool = False, framing: Framing | None = None, **limits: float
) -> Harness:
    h = make(*members, hot=hot, framing=framing, **limits)
    h.start()
    for name, _ in members:
        h(UpstreamConnected(name))
    return h


def test_start_connects_everyone_and_holds_the_client() -> None:
    h = make((P, "primary"), (R, "replica"), (S, "shadow"))
    acts = h.start()
    assert [a.name for a in acts if isinstance(a, Connect)] == [P, R, S]
    assert PauseReading(CLIENT) in acts


def test_input_is_held_until_the_primary_connects() -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(UpstreamConnected(R))
    h(ClientData(b"early"))
    assert not h.writes(), "nothing may be written before the primary is there"
    acts = h(UpstreamConnected(P))
    assert h.written[P] == b"early"
    assert h.written[R] == b"early"
    assert ResumeReading(CLIENT) in acts


def test_one_bytes_object_is_shared_by_every_upstream_write() -> None:
    h = connected((P, "primary"), (R, "replica"), (S, "shadow"))
    chunk = b"x" * 100
    h.actions.clear()
    h(ClientData(chunk))
    writes = h.writes()
    assert [target for target, _ in writes] == [P, R, S]
    assert all(data is chunk for _, data in writes)
    # The hot path's shortcut does the same.
    h.actions.clear()
    chunk2 = b"y" * 10
    h.record(h.session.client_data(chunk2))
    assert h.writes() == [(P, chunk2), (R, chunk2), (S, chunk2)]
    assert all(data is chunk2 for _, data in h.writes())
    assert h.session.fed(R) == 110 and h.session.received == 110


def test_client_gets_the_primary_only() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(ClientData(b"GET"))
    h(UpstreamData(R, b"from replica"))
    h(UpstreamData(P, b"from replica"))
    assert h.written[CLIENT] == b"from replica"
    h(UpstreamData(R, b"!"))
    assert h.written[CLIENT] == b"from replica"


def test_divergence_is_reported_once_with_offset_and_excerpt() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(UpstreamData(P, b"hello world"))
    h(UpstreamData(R, b"hello there"))
    h(UpstreamData(P, b"more"))
    h(UpstreamData(R, b"different"))
    reports = h.reports("divergence")
    assert len(reports) == 1
    assert "offset 6" in reports[0].detail
    assert "|world|" in reports[0].detail and "|there|" in reports[0].detail
    assert not h.session.matched(R)
    assert h.written[CLIENT] == b"hello worldmore"


def test_divergence_when_the_replica_is_ahead() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(UpstreamData(R, b"abcdef"))
    h(UpstreamData(P, b"abcX"))
    [report] = h.reports("divergence")
    assert "offset 3" in report.detail


def test_a_replica_stale_in_the_view_leaves_the_session_which_goes_on() -> None:
    h = connected((P, "primary"), (R, "replica"), (S, "shadow"))
    h(ClientData(b"a"))
    acts = h(BackendStale(R, "stale in view epoch 3"))
    assert Abort(R) in acts
    assert [r.detail for r in h.reports("dropped")] == ["stale in the view: stale in view epoch 3"]
    assert not h.session.in_session(R)
    assert h(BackendStale(P, "ignored")) == [], "the primary leaves by PrimaryDown, not this"
    assert h(BackendStale(S, "ignored")) == [], "a shadow is never stale"
    assert h(BackendStale(R, "again")) == [], "gone already"
    h(ClientData(b"b"))
    assert h.written[P] == b"ab"
    assert h.written[R] == b"a"
    assert h.written[S] == b"ab"


def test_over_memory_a_replica_or_shadow_leaves_quietly_and_the_session_goes_on() -> None:
    h = connected((P, "primary"), (R, "replica"), (S, "shadow"))
    h(ClientData(b"a"))
    acts = h(OverMemory(R, "over replica_memory"))
    assert Abort(R) in acts
    assert MarkStale(R, "over replica_memory") in acts
    assert h.reports("dropped") == [], "the server says it once for every session"
    assert not h.session.in_session(R)
    assert h(OverMemory(P, "ignored")) == [], "the primary is never affected"
    acts = h(OverMemory(S, "over replica_memory"))
    assert Abort(S) in acts
    assert h.stale() == {R}, "a shadow is never stale"
    assert h(OverMemory(R, "again")) == [], "gone already"
    assert h(OverMemory("nobody", "not a member")) == []
    h(ClientData(b"b"))
    assert h.written[P] == b"ab"
    assert h.written[R] == b"a"
    assert h.written[S] == b"a"
    assert not h.session.finished


def test_over_memory_cuts_a_connection_still_closing_and_its_last_input() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(ClientData(b"a"))
    acts = h(Shutdown())
    assert Close(R) in acts
    assert not h.session.in_session(R)
    assert h.stale() == set()
    acts = h(OverMemory(R, "over replica_memory"))
    assert acts == [MarkStale(R, "over replica_memory"), Abort(R)]
    assert h(OverMemory(R, "again")) == [], "cut already"
    h(UpstreamClosed(R, None))
    h(UpstreamClosed(P, None))
    h(ClientClosed())
    assert h.session.finished


def test_over_memory_before_it_connects_drops_what_the_session_held_for_it() -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(UpstreamConnected(P))
    h(ClientData(b"123456"))
    assert h.session.held(R) == 6
    acts = h(OverMemory(R, "over replica_memory"))
    assert Abort(R) in acts and R in h.stale()
    assert h.session.held(R) == 0
    h(UpstreamConnected(R))  # (a connect that was under way)
    h(ClientData(b"7"))
    assert h.written[P] == b"1234567"
    assert h.written[R] == b""


def test_over_memory_leaves_a_replica_on_its_way_to_replace_the_primary_alone() -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(UpstreamConnected(R))
    h(UpstreamConnectFailed(P, "refused"))
    assert [a.name for a in h.actions if isinstance(a, Promote)] == [R]
    assert h(OverMemory(R, "over replica_memory")) == []
    h(PromoteResult(R, True))
    assert h.session.primary == R
    assert h(OverMemory(R, "over replica_memory")) == []
    h(ClientData(b"x"))
    assert h.written[R] == b"x"


def test_replica_write_block_drops_it_and_marks_it_stale() -> None:
    h = connected((P, "primary"), (R, "replica"), (S, "shadow"))
    h(ClientData(b"a"))
    acts = h(WriteBlocked(R))
    assert Abort(R) in acts
    assert h.stale() == {R}
    acts = h(WriteBlocked(S))
    assert Abort(S) in acts
    assert h.stale() == {R}, "a shadow is never marked stale"
    assert len(h.reports("dropped")) == 2
    h(ClientData(b"b"))
    assert h.written[P] == b"ab"
    assert h.written[R] == b"a"
    assert not h.session.in_session(R)


def test_replica_held_input_is_bounded_before_it_connects() -> None:
    h = make((P, "primary"), (R, "replica"), replica_buffer=10)
    h.start()
    h(UpstreamConnected(P))
    h(ClientData(b"123456"))
    assert h.session.held(R) == 6
    h(ClientData(b"7890X"))
    assert R in h.stale()
    assert h.session.held(R) == 0
    assert Abort(R) in h.actions
    assert h.written[P] == b"1234567890X"


def test_primary_backpressure_pauses_the_client() -> None:
    h = connected((P, "primary"), (R, "replica"))
    assert h(WriteBlocked(P)) == [PauseReading(CLIENT)]
    assert h(WriteBlocked(R)) != []  # replica dropped, the client stays paused
    assert ResumeReading(CLIENT) not in h.actions[-3:]
    assert h(WriteUnblocked(P)) == [ResumeReading(CLIENT)]


def test_slow_client_pauses_the_primary() -> None:
    h = connected((P, "primary"), (R, "replica"))
    assert h(WriteBlocked(CLIENT)) == [PauseReading(P)]
    assert h(WriteUnblocked(CLIENT)) == [ResumeReading(P)]


def test_replica_far_ahead_is_paused_then_resumed() -> None:
    h = connected((P, "primary"), (R, "replica"), compare_window=10)
    assert h(UpstreamData(R, b"x" * 11)) == [PauseReading(R)]
    acts = h(UpstreamData(P, b"x" * 8))
    assert ResumeReading(R) in acts
    assert not h.reports("divergence")


def test_replica_far_behind_is_no_longer_compared() -> None:
    h = connected((P, "primary"), (R, "replica"), compare_window=10)
    h(UpstreamData(P, b"y" * 11))
    [lost] = h.reports("compare_lost")
    assert lost.name == R
    h(UpstreamData(R, b"z" * 20))
    assert not h.reports("divergence")
    assert h.session.matched(R), "not compared is not the same as diverged"


def test_half_close_both_ways_and_normal_end() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(ClientData(b"req"))
    acts = h(ClientEof())
    assert WriteEof(P) in acts and WriteEof(R) in acts
    assert h.eof_sent == {P: 3, R: 3}
    h(UpstreamData(P, b"resp"))
    h(UpstreamData(R, b"resp"))
    # The primary's EOF waits for the replica to confirm it (bounded by close_grace).
    assert h(UpstreamEof(P)) == [StartTimer(Timer.PRIMARY_EOF, 0.2)]
    acts = h(UpstreamEof(R))
    assert WriteEof(CLIENT) in acts
    assert Close(CLIENT) in acts and Close(P) in acts and Close(R) in acts
    h(ClientClosed())
    h(UpstreamClosed(P))
    acts = h(UpstreamClosed(R))
    assert acts == [Finished("ok")]
    assert not h.stale()


def test_primary_half_close_lets_the_client_keep_sending() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(UpstreamData(P, b"bye"))
    h(UpstreamData(R, b"bye"))
    h(UpstreamEof(P))
    h(ClientData(b"more"))
    assert h.written[P] == b"more" and h.written[R] == b"more"
    assert not h.of(Close)


def test_replica_that_never_closes_is_closed_after_close_grace() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(ClientEof())
    h(UpstreamEof(P))
    assert Close(R) not in h.actions and WriteEof(CLIENT) not in h.actions
    # The replica kept its connection: is the primary still there?
    assert h(TimerFired(Timer.PRIMARY_EOF)) == [CheckPrimary(P)]
    acts = h(PrimaryChecked(P, alive=True))  # it is: it ended the session itself
    assert WriteEof(CLIENT) in acts
    assert Close(R) in h(TimerFired(Timer.CLOSE_GRACE))
    assert not h.stale() and not h.of(Promote)
    assert h.session.outcome == "ok", "the client ended its side first"


def test_client_reset_flushes_then_closes_every_upstream() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(ClientData(b"half a request"))
    acts = h(ClientClosed("ConnectionResetError"))
    assert Close(P) in acts and Close(R) in acts
    assert not [a for a in acts if isinstance(a, Abort)], "accepted input must still arrive"
    h(UpstreamClosed(P))
    assert h(UpstreamClosed(R)) == [Finished("client_reset")]


def test_primary_unreachable_and_no_replica_refuses_without_sending_anything() -> None:
    h = make((P, "primary"), (R, "replica"), (S, "shadow"))
    h.start()
    h(ClientData(b"secret"))
    h(UpstreamConnected(S))
    h(UpstreamConnectFailed(R, "refused"))
    acts = h(UpstreamConnectFailed(P, "refused"))
    assert Abort(S) in acts and Close(CLIENT) in acts
    assert not [a for a in h.actions if isinstance(a, Promote)], "a shadow is never promoted"
    assert not h.writes()
    h(UpstreamClosed(S))
    assert h(ClientClosed()) == [Finished("refused")]


def test_primary_unreachable_promotes_the_first_replica_in_order() -> None:
    h = make((P, "primary"), ("r1", "replica"), ("r2", "replica"), (S, "shadow"))
    h.start()
    h(ClientData(b"hello"))
    h(UpstreamConnected("r2"))
    h(UpstreamConnected(S))
    # r1 is still connecting: wait for it, it comes first in config order.
    assert h(UpstreamConnectFailed(P, "refused")) == [Report("connect_failed", P, "refused")]
    acts = h(UpstreamConnected("r1"))
    assert acts == [Promote("r1", P, "primary unreachable: refused", "connect")]
    assert not h.writes(), "nothing is sent before the new primary is confirmed"
    acts = h(PromoteResult("r1", ok=True))
    assert h.session.primary == "r1"
    assert h.session.promoted == "r1"
    assert ResumeReading(CLIENT) in acts
    assert h.written["r1"] == b"hello" and h.written["r2"] == b"hello"
    assert h.written[S] == b"hello"
    h(UpstreamData("r1", b"answer"))
    h(UpstreamData("r2", b"answer"))
    assert h.written[CLIENT] == b"answer"
    assert not h.reports("divergence")
    assert not h.stale()


def test_primary_unreachable_and_promotion_refused_closes_the_client() -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(UpstreamConnected(R))
    h(UpstreamConnectFailed(P, "refused"))
    acts = h(PromoteResult(R, ok=False))
    assert Abort(R) in acts and Close(CLIENT) in acts
    assert not h.writes()


def test_primary_down_without_a_replica_ends_the_session() -> None:
    h = connected((P, "primary"), (S, "shadow"))
    acts = h(PrimaryDown("3 checks failed"))
    assert Close(CLIENT) in acts
    assert h.session.outcome == "primary_failed"
    assert not [a for a in acts if isinstance(a, Promote)]


def test_replica_unreachable_is_stale_and_the_session_goes_on() -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(ClientData(b"x"))
    h(UpstreamConnectFailed(R, "refused"))
    h(UpstreamConnected(P))
    h(ClientData(b"y"))
    assert h.written[P] == b"xy"
    assert h.stale() == {R}
    assert not h.session.in_session(R)


def test_replica_lost_mid_session_is_stale() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(UpstreamClosed(R, "ConnectionResetError"))
    # Level with the primary: the server may be ending the session (close_grace).
    assert StartTimer(Timer.REPLICA_EOF, 0.2) in h.actions
    h(ClientData(b"z"))
    assert h.written[P] == b"z" and h.written[R] == b""
    h(TimerFired(Timer.REPLICA_EOF))  # it was not: the primary goes on
    assert h.stale() == {R}
    assert not h.session.in_session(R)


def test_replica_that_closed_cleanly_behind_the_primary_is_stale_at_once() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(UpstreamData(P, b"answer"))
    h(UpstreamEof(R))  # a FIN comes after all its output: it said less
    assert h.stale() == {R}


def test_a_reset_may_lose_output_so_it_is_judged_by_the_primarys_end() -> None:
    """A reset (a server closing with input unread) can drop its last reply before the
    proxy reads it: the replica is stale only if the primary does not end too."""
    h = connected((P, "primary"), (R, "replica"))
    h(ClientData(b"x" * 100))
    h(UpstreamData(P, b"-ERR too big\r\n"))
    h(UpstreamClosed(R, "ConnectionResetError"))  # its error reply never read
    assert not h.stale()
    h(UpstreamClosed(P, "ConnectionResetError"))
    assert not h.stale() and not h.of(Promote)
    assert h.session.outcome == "server_closed"
    assert h.written[CLIENT] == b"-ERR too big\r\n"
    # The same reset, and the primary goes on: stale once close_grace is over.
    h = connected((P, "primary"), (R, "replica"))
    h(UpstreamData(P, b"answer"))
    h(UpstreamClosed(R, "ConnectionResetError"))
    h(UpstreamData(P, b" and more"))
    h(TimerFired(Timer.REPLICA_EOF))
    assert h.stale() == {R}


def test_replica_that_does_not_take_its_input_at_the_end_is_stale() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(ClientEof())
    h(UpstreamEof(P))
    h(TimerFired(Timer.PRIMARY_EOF))
    h(TimerFired(Timer.CLOSE_GRACE))
    acts = h(TimerFired(Timer.LINGER))
    assert Abort(R) in acts
    assert R in h.stale()


def test_replica_closing_before_the_primarys_output_leaves_and_is_stale() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(UpstreamData(P, b"abc"))
    h(UpstreamData(R, b"ab"))
    acts = h(UpstreamEof(R))  # a crash closes with FIN: not a divergence, a loss
    assert not h.reports("divergence")
    [report] = h.reports("dropped")
    assert "closed its output at offset 2, before the primary's 3 bytes" in report.detail
    assert Abort(R) in acts and R in h.stale()
    h(ClientEof())
    acts = h(UpstreamEof(P))
    assert WriteEof(CLIENT) in acts, "a diverged replica is not waited for"


# --------------------------------------------------------------- properties

chunks = st.lists(st.binary(min_size=1, max_size=40), max_size=12)


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in pieces of the given sizes, the rest as a last piece."""
    out, rest = [], data
    for size in sizes:
        if not rest:
            break
        out.append(rest[:size])
        rest = rest[size:]
    return [*out, rest] if rest else out


@settings(max_examples=300, deadline=None)
@given(
    client_chunks=chunks,
    primary_chunks=chunks,
    replica_split=st.lists(st.integers(min_value=1, max_value=50), max_size=20),
    order=st.randoms(use_true_random=False),
    replicas=st.integers(min_value=0, max_value=3),
    window=st.sampled_from([10, 64, 1 << 20]),
)
def test_every_upstream_gets_the_client_stream_and_the_client_the_primarys(
    client_chunks: list[bytes],
    primary_chunks: list[bytes],
    replica_split: list[int],
    order: object,
    replicas: int,
    window: int,
) -> None:
    import random

    assert isinstance(order, random.Random)
    names = [f"r{i}" for i in range(replicas)]
    h = make((P, "primary"), *[(n, "replica") for n in names], compare_window=window)
    h.start()
    primary_stream = b"".join(primary_chunks)
    # Each replica answers the same bytes, cut at other places.
    streams: dict[str, list[bytes]] = {P: list(primary_chunks)}
    for n in names:
        streams[n] = _cut(primary_stream, replica_split)
    # Interleave everything in a random order; connects in a random position too.
    events: list[Event] = [ClientData(c) for c in client_chunks]
    for name in [P, *names]:
        pos = order.randint(0, len(events))
        events.insert(pos, UpstreamConnected(name))
    for name, parts in streams.items():
        # Each part goes after the connect and after the part before it.
        at = next(i for i, e in enumerate(events) if e == UpstreamConnected(name))
        for part in parts:
            at = order.randint(at + 1, len(events))
            events.insert(at, UpstreamData(name, part))
    for e in events:
        h(e)
    client_stream = b"".join(client_chunks)
    for name in [P, *names]:
        assert bytes(h.written[name]) == client_stream, name
        assert h.session.fed(name) == len(client_stream)
    assert bytes(h.written[CLIENT]) == primary_stream
    assert h.session.delivered == h.session.out(P) == len(primary_stream)
    assert not h.reports("divergence")
    assert not h.stale()


@settings(max_examples=300, deadline=None)
@given(
    stream=st.binary(min_size=1, max_size=200),
    flip=st.one_of(st.none(), st.integers(min_value=0, max_value=199)),
    cuts=st.lists(st.lists(st.integers(min_value=1, max_value=30), max_size=10), min_size=4,
                  max_size=4),
    order=st.randoms(use_true_random=False),
    window=st.sampled_from([8, 40, 1 << 20]),
    mode=st.sampled_from(["async", "sync"]),
    pauses=st.lists(st.integers(min_value=0, max_value=60), max_size=3),
    eofs=st.sets(st.sampled_from([P, "r1", "r2", S])),
    short=st.integers(min_value=0, max_value=20),
    client_gone=st.one_of(st.none(), st.integers(min_value=1, max_value=60)),
    who=st.sampled_from([(P, "r1", "r2", S), (P,), (P, S), (P, "r1")]),
    settle_at=st.sets(st.integers(min_value=0, max_value=80)),
)  # fmt: skip
def test_the_hot_path_does_exactly_what_handle_does(
    stream: bytes,
    flip: int | None,
    cuts: list[list[int]],
    order: object,
    window: int,
    mode: str,
    pauses: list[int],
    eofs: set[str],
    short: int,
    client_gone: int | None,
    who: tuple[str, ...],
    settle_at: set[int],
) -> None:
    """The driver's shortcuts (the plan, passed, checked, then handle) = handle() alone.

    Over replicas and a shadow ahead of and behind the primary, a window small enough
    to pause the primary and lose comparisons, a replica that diverges, one that
    answers less, upstreams that end (early or not), the client's writes blocking
    for a while, and the client going away; and a primary alone, or with a shadow
    or one replica.
    """
    roles = {P: "primary", "r1": "replica", "r2": "replica", S: "shadow"}
    members = tuple((name, roles[name]) for name in who)
    cold = connected(*members, compare_window=window, mode=mode)  # type: ignore[arg-type]
    hot = connected(*members, compare_window=window, mode=mode, hot=True)  # type: ignore[arg-type]
    other = bytearray(stream)
    if flip is not None:
        other[flip % len(stream)] ^= 0x01
    outputs = {P: stream, "r1": stream[: len(stream) - short], "r2": bytes(other), S: stream}
    chunks = {
        name: _cut(out, cut)
        for (name, out), cut in zip(outputs.items(), cuts, strict=True)
        if name in who
    }
    events: list[Event] = [ClientData(b"request")]
    for name, chunk in _interleave(order, chunks):
        events.append(UpstreamData(name, chunk))
        if name in eofs and chunk is chunks[name][-1]:
            events.append(UpstreamEof(name))
    for at in sorted(pauses, reverse=True):
        if at < len(events):
            events[at:at] = [WriteBlocked(CLIENT), ClientData(b"more"), WriteUnblocked(CLIENT)]
    if client_gone is not None:
        events.insert(min(client_gone, len(events)), ClientClosed("ConnectionResetError"))
    for i, event in enumerate(events):
        assert hot(event) == cold(event), f"event {i}: {event}"
        if i not in settle_at and i < len(events) - 1:
            continue
        # And the same state once settled (as the driver may at any time, for the
        # idle check and the byte counts), the window kept for comparisons included.
        hot.settle()
        assert hot.session.received == cold.session.received
        assert hot.session.delivered == cold.session.delivered
        assert hot.session._window == cold.session._window
        assert hot.session._window_base == cold.session._window_base
        for name, _ in members:
            assert hot.session.out(name) == cold.session.out(name), name
            assert hot.session.fed(name) == cold.session.fed(name), name


@given(
    a=st.binary(max_size=12),
    b=st.binary(max_size=12),
    a_at=st.integers(0, 14),
    b_at=st.integers(0, 14),
    k=st.integers(0, 14),
    a_mutable=st.booleans(),
    b_mutable=st.booleans(),
)
def test_same_is_slice_equality(
    a: bytes, b: bytes, a_at: int, b_at: int, k: int, a_mutable: bool, b_mutable: bool
) -> None:
    """The comparison every mirror chunk goes through: slices of exactly k equal bytes."""
    expected = k == 0 or (a[a_at : a_at + k] == b[b_at : b_at + k] and len(a[a_at:]) >= k)
    left = bytearray(a) if a_mutable else a
    right = bytearray(b) if b_mutable else b
    assert _same(left, a_at, right, b_at, k) == expected


@pytest.mark.parametrize("hot", [False, True])
def test_a_replica_that_ended_where_the_primary_was_leaves_when_the_primary_goes_on(
    hot: bool,
) -> None:
    h = connected((P, "primary"), (R, "replica"), hot=hot)
    h(ClientData(b"request"))
    h(UpstreamData(P, b"abc"))
    h(UpstreamData(R, b"abc"))
    h(UpstreamEof(R))  # level with the primary: not early, yet
    assert not h.stale()
    h(UpstreamData(P, b"def"))  # now it is
    assert R in h.stale()
    assert not h.session.in_session(R)
    assert bytes(h.written[CLIENT]) == b"abcdef"


@settings(max_examples=200, deadline=None)
@given(
    stream=st.binary(min_size=1, max_size=200),
    flip=st.integers(min_value=0, max_value=199),
    p_cuts=st.lists(st.integers(min_value=1, max_value=30), max_size=10),
    r_cuts=st.lists(st.integers(min_value=1, max_value=30), max_size=10),
    order=st.randoms(use_true_random=False),
)
def test_first_mismatch_is_found_at_its_offset_whatever_the_chunking(
    stream: bytes, flip: int, p_cuts: list[int], r_cuts: list[int], order: object
) -> None:
    import random

    assert isinstance(order, random.Random)
    flip %= len(stream)
    other = bytearray(stream)
    other[flip] ^= 0xFF

    h = connected((P, "primary"), (R, "replica"))
    p_parts = [UpstreamData(P, c) for c in _cut(stream, p_cuts)]
    r_parts = [UpstreamData(R, c) for c in _cut(bytes(other), r_cuts)]
    # A random interleaving that keeps each side's own order.
    events: list[Event] = []
    while p_parts or r_parts:
        side = p_parts if (p_parts and (not r_parts or order.random() < 0.5)) else r_parts
        events.append(side.pop(0))
    for e in events:
        h(e)
    [report] = h.reports("divergence")
    assert f"offset {flip}:" in report.detail
    assert bytes(h.written[CLIENT]) == stream


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=4000), min_size=1, max_size=30),
    limit=st.integers(min_value=1000, max_value=20000),
)
def test_held_input_never_exceeds_replica_buffer(sizes: list[int], limit: int) -> None:
    h = make((P, "primary"), (R, "replica"), replica_buffer=limit)
    h.start()
    h(UpstreamConnected(P))
    for n in sizes:
        h(ClientData(b"q" * n))
        assert h.session.held(R) <= limit
    assert (R in h.stale()) == (sum(sizes) > limit)


def test_unknown_event_is_a_bug() -> None:
    h = make((P, "primary"))
    # (The base class: a compiled Event cannot be subclassed by a test's class.)
    with pytest.raises(TypeError, match="unknown event"):
        h(Event())


def test_a_session_needs_one_primary() -> None:
    with pytest.raises(ValueError, match="exactly one primary"):
        Session([Member("a", "replica")])


def test_client_reset_before_the_primary_connects_sends_nothing_anywhere() -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(ClientData(b"never mind"))
    acts = h(ClientClosed("ConnectionResetError"))
    assert Abort(P) in acts and Abort(R) in acts
    assert not h.writes()
    assert not h.stale(), "nobody got the bytes, so nobody missed them"
    h(UpstreamClosed(P))
    assert h(UpstreamClosed(R)) == [Finished("client_reset")]


def test_a_replica_still_connecting_when_the_session_ends_takes_its_input_late() -> None:
    # A TLS handshake to a distant replica may outlast a short session.
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(UpstreamConnected(P))
    h(ClientData(b"only the primary has this"))
    h(ClientEof())
    h(UpstreamData(P, b"+OK\r\n"))
    h(UpstreamEof(P))
    h(ClientClosed(None))
    assert Abort(R) not in h.actions and not h.stale()
    h(UpstreamClosed(P))
    assert Finished("ok") not in h.actions, "the session waits for the replica"
    acts = h(UpstreamConnected(R))
    assert (R, b"only the primary has this") in h.writes()
    assert StartTimer(Timer.CLOSE_GRACE, h.session.limits.close_grace) in acts
    h(UpstreamData(R, b"+OK\r\n"))
    h(UpstreamEof(R))
    assert Close(R) in h.actions
    [finished] = h(UpstreamClosed(R))
    assert isinstance(finished, Finished)
    assert not h.stale() and not h.reports("diverged")


def test_a_late_replica_that_answers_otherwise_diverges() -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(UpstreamConnected(P))
    h(ClientData(b"AUTH secret\r\n"))
    h(UpstreamData(P, b"+OK\r\n"))
    h(ClientClosed("ConnectionResetError"))
    h(UpstreamConnected(R))
    h(UpstreamData(R, b"-WRONGPASS\r\n"))
    assert h.stale() == {R}


@pytest.mark.parametrize(
    "end", [TimerFired(Timer.LINGER), UpstreamConnectFailed(R, "no answer within 5 s")]
)
def test_a_replica_still_connecting_at_linger_or_that_cannot_connect_is_stale(end: Event) -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(UpstreamConnected(P))
    h(ClientData(b"only the primary has this"))
    h(ClientClosed("ConnectionResetError"))
    assert not h.stale()
    h(end)
    assert h.stale() == {R}


def test_primary_down_while_still_connecting_fails_over_like_a_refused_connect() -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(ClientData(b"req"))
    h(UpstreamConnected(R))
    acts = h(PrimaryDown("health checks failed"))
    assert Abort(P) in acts
    assert Promote(R, P, "primary unreachable: marked down: health checks failed") in acts
    h(PromoteResult(R, ok=True))
    assert h.written[R] == b"req" and h.written[P] == b""
    h(UpstreamClosed(P))
    assert h.session.primary == R and not h.session.finished


def test_replica_that_closed_before_the_primary_and_got_more_input_is_stale() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(ClientData(b"first "))
    h(UpstreamEof(R))  # a killed process closes with FIN
    h(ClientData(b"second"))
    h(ClientEof())
    h(UpstreamData(P, b"answer"))
    h(UpstreamEof(P))
    h(UpstreamClosed(R, None))  # closed quietly: nothing else tells it missed input
    assert R in h.stale()


def test_replica_closing_at_the_same_point_as_the_primary_is_not_stale() -> None:
    h = connected((P, "primary"), (R, "replica"))
    h(ClientData(b"question"))
    h(UpstreamData(P, b"bye"))
    h(UpstreamData(R, b"bye"))
    h(UpstreamEof(R))
    h(UpstreamEof(P))
    h(ClientData(b"late"))  # reaches two half-closed servers alike
    h(ClientEof())
    h(UpstreamClosed(P, None))
    h(UpstreamClosed(R, "ConnectionResetError"))
    assert not h.stale()


# ------------------------------------------------------------------ takeover


def _interleave(order: object, streams: dict[str, list[bytes]]) -> list[tuple[str, bytes]]:
    """A random interleaving of each upstream's chunks that keeps each one's own order."""
    import random

    assert isinstance(order, random.Random)
    queues = {k: list(v) for k, v in streams.items() if v}
    out: list[tuple[str, bytes]] = []
    while queues:
        name = order.choice(sorted(queues))
        out.append((name, queues[name].pop(0)))
        if not queues[name]:
            del queues[name]
    return out


CRASHES = st.sampled_from(["reset", "down", "eof"])


def _play_with_crash(
    h: Harness, events: list[tuple[str, bytes]], crash_at: int, crash: str
) -> None:
    """Feed the output chunks in order; the primary fails before chunk ``crash_at``.

    When the session asks whether the primary is alive, it is not (it crashed).
    """
    crashed = False
    for i, (name, chunk) in enumerate(events):
        if i == crash_at and not crashed:
            crashed = True
            h({"reset": UpstreamClosed(P, "ConnectionResetError"),
               "down": PrimaryDown("health"),
               "eof": UpstreamEof(P)}[crash])  # fmt: skip
        _answer_checks(h)
        if crashed and name == P:
            continue  # a dead primary says nothing more
        if h.session.in_session(name):
            h(UpstreamData(name, chunk))
            _answer_checks(h)


def _answer_checks(h: Harness) -> None:
    """Answer a CheckPrimary the session asked for: the primary is down."""
    asked = [a for a in h.actions if isinstance(a, CheckPrimary)]
    answered = [e for e in h.answered]
    if len(asked) > len(answered):
        h.answered.append(asked[-1].name)
        h(PrimaryChecked(asked[-1].name, alive=False, reason="Connection refused"))


@settings(max_examples=400, deadline=None)
@given(
    stream=st.binary(min_size=1, max_size=120),
    cuts=st.lists(st.lists(st.integers(min_value=1, max_value=25), max_size=8), min_size=3,
                  max_size=3),
    crash_at=st.integers(min_value=0, max_value=40),
    crash=CRASHES,
    order=st.randoms(use_true_random=False),
    mode=st.sampled_from(["async", "sync"]),
)  # fmt: skip
def test_takeover_gives_the_client_one_copy_of_the_stream_whatever_the_timing(
    stream: bytes, cuts: list[list[int]], crash_at: int, crash: str, order: object, mode: str
) -> None:
    h = connected((P, "primary"), ("r1", "replica"), ("r2", "replica"), mode=mode)  # type: ignore[arg-type]
    h(ClientData(b"request"))
    events = _interleave(
        order, {P: _cut(stream, cuts[0]), "r1": _cut(stream, cuts[1]), "r2": _cut(stream, cuts[2])}
    )
    _play_with_crash(h, events, crash_at, crash)
    for name in ("r1", "r2", P):
        if h.session.in_session(name):
            h(UpstreamEof(name))
    if not h.session.finished and Timer.PRIMARY_EOF in [
        a.timer for a in h.actions if isinstance(a, StartTimer)
    ]:
        h(TimerFired(Timer.PRIMARY_EOF))
        _answer_checks(h)
    assert bytes(h.written[CLIENT]) == stream, "exactly one copy, no gap, no duplicate"
    assert not h.reports("divergence")


@settings(max_examples=400, deadline=None)
@given(
    stream=st.binary(min_size=2, max_size=120),
    flip=st.integers(min_value=0, max_value=119),
    cuts=st.lists(st.lists(st.integers(min_value=1, max_value=25), max_size=8), min_size=2,
                  max_size=2),
    crash_at=st.integers(min_value=0, max_value=30),
    crash=CRASHES,
    order=st.randoms(use_true_random=False),
    mode=st.sampled_from(["async", "sync"]),
)  # fmt: skip
def test_takeover_never_splices_mismatched_bytes(
    stream: bytes,
    flip: int,
    cuts: list[list[int]],
    crash_at: int,
    crash: str,
    order: object,
    mode: str,
) -> None:
    flip %= len(stream)
    other = bytearray(stream)
    other[flip] ^= 0x01
    replica_stream = bytes(other)
    h = connected((P, "primary"), (R, "replica"), mode=mode)  # type: ignore[arg-type]
    h(ClientData(b"request"))
    events = _interleave(order, {P: _cut(stream, cuts[0]), R: _cut(replica_stream, cuts[1])})
    _play_with_crash(h, events, crash_at, crash)
    got = bytes(h.written[CLIENT])
    # Either the primary's bytes, or (after a takeover before the mismatch) the
    # replica's: a prefix of one stream or the other, never a mix of the two.
    assert stream.startswith(got) or replica_stream.startswith(got), (got, stream, replica_stream)
    if mode == "sync":
        # Every byte the client got was produced by the replica too, unless the
        # replica was ejected (stale) first.
        assert replica_stream.startswith(got) or R in h.stale()


def test_running_out_of_descriptors_blames_no_backend() -> None:
    h = make((P, "primary"), (R, "replica"))
    h.start()
    h(ClientData(b"x"))
    h(UpstreamConnected(R))
    acts = h(UpstreamConnectFailed(P, "Too many open files", local=True))
    assert not [a for a in acts if isinstance(a, Promote)], "no failover for a local shortage"
    assert Abort(R) in acts and Close(CLIENT) in acts
    assert not h.stale()
    assert h.session.outcome == "overloaded"


def test_sync_mode_passes_on_the_last_reply_when_a_replica_broke_off_with_the_primary() -> None:
    """A too-big request in sync mode: both servers answer an error and reset; the
    replica's answer is lost with its connection. The client still gets the error."""
    h = connected((P, "primary"), (R, "replica"), mode="sync")  # type: ignore[arg-type]
    h(ClientData(b"x" * 100))
    err = b"-ERR Protocol error: too big inline request\r\n"
    h(UpstreamData(P, err))
    assert not h.written[CLIENT], "not confirmed yet"
    h(UpstreamClosed(R, "ConnectionResetError"))
    h(UpstreamClosed(P, "ConnectionResetError"))
    assert h.written[CLIENT] == err
    assert h.session.outcome == "server_closed"
    assert not h.stale() and not h.of(Promote)


def test_a_replica_that_closes_on_the_clients_eof_with_replies_unsent_is_not_stale() -> None:
    """Redis closes a connection when it reads EOF, replies not yet written or not: a
    replica behind on its output ends short, having taken every input byte."""
    h = connected((P, "primary"), (R, "replica"))
    h(ClientData(b"GET a\r\nGET b\r\n"))
    h(ClientEof())
    h(UpstreamData(P, b"$1\r\n1\r\n$1\r\n2\r\n"))
    h(UpstreamData(R, b"$1\r\n1\r\n"))
    h(UpstreamEof(R))
    h(UpstreamEof(P))
    assert not h.stale()
    assert h.written[CLIENT] == b"$1\r\n1\r\n$1\r\n2\r\n"
    # Input it never had is another matter.
    h = connected((P, "primary"), (R, "replica"))
    h(ClientData(b"GET a\r\nGET b\r\n"))
    h(UpstreamData(P, b"$1\r\n1\r\n$1\r\n2\r\n"))
    h(UpstreamData(R, b"$1\r\n1\r\n"))
    h(UpstreamEof(R))
    assert h.stale() == {R}


# ------------------------------------------------------- staleness, by property

ENDS = st.sampled_from(["eof", "reset"])


@settings(max_examples=400, deadline=None)
@given(
    before=st.lists(st.sampled_from(["client", "primary", "replica", "diverge", "pause"]),
                    max_size=6),
    after=st.lists(st.sampled_from(["primary", "replica", "pause", "client"]), max_size=4),
    end=ENDS,
    mode=st.sampled_from(["async", "sync"]),
    framed=st.booleans(),
    hot=st.booleans(),
)  # fmt: skip
def test_a_replica_that_ends_while_the_clients_input_goes_on_is_stale(
    before: list[str], after: list[str], end: str, mode: str, framed: bool, hot: bool
) -> None:
    """Whatever came before (client data, output, a divergence, a full write buffer)
    and after, a replica that ends its side while the client goes on sending and the
    primary stays open is stale by the time the session's timers have run."""
    from replicaproxy.core.resp import RespFraming, RespRules

    h = connected(
        (P, "primary"),
        (R, "replica"),
        framing=RespFraming(RespRules()) if framed else None,
        hot=hot,
        mode=mode,  # type: ignore[arg-type]
    )

    def step(what: str) -> None:
        if not h.session.in_session(R) and what in ("replica", "diverge", "pause"):
            return
        if what == "client":
            h(ClientData(b"PING\r\n"))
        elif what == "primary":
            h(UpstreamData(P, b"+PONG\r\n"))
        elif what == "replica":
            h(UpstreamData(R, b"+PONG\r\n"))
        elif what == "diverge":
            h(UpstreamData(R, b"-ERR no\r\n"))
        elif what == "pause":
            h(WriteBlocked(R))

    for what in before:
        step(what)
    h(ClientData(b"PING\r\n"))
    if h.session.in_session(R):
        h(UpstreamEof(R) if end == "eof" else UpstreamClosed(R, "ConnectionResetError"))
    for what in after:
        step(what)
    h(ClientData(b"PING\r\n"))  # the client's input goes on after the replica ended
    h(UpstreamData(P, b"+PONG\r\n"))  # and so does the primary
    for timer in (Timer.REPLICA_EOF, Timer.PRIMARY_EOF, Timer.REPLICA_TIMEOUT):
        if not h.session.finished:
            h(TimerFired(timer))
    _answer_checks(h)
    assert R in h.stale(), [type(a).__name__ for a in h.actions]
    assert h.session.primary == P, "the primary never failed"
