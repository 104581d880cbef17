"""Tier 1: sessions framed by protocol (RESP), replies compared as messages."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_session import Harness, P, R, _answer_checks, _cut, connected

from replicaproxy.core.events import (
    CLIENT,
    CheckPrimary,
    ClientData,
    Event,
    PrimaryChecked,
    PrimaryDown,
    Promote,
    StartTimer,
    Timer,
    TimerFired,
    UpstreamClosed,
    UpstreamData,
    UpstreamEof,
)
from replicaproxy.core.resp import RespFraming, RespParser, RespRules

RULES = RespRules()


def resp(*, hot: bool = False, **limits: Any) -> Harness:
    return connected((P, "primary"), (R, "replica"), hot=hot, framing=RespFraming(RULES), **limits)


def bulk(text: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(text), text)


def array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(bulk(i) for i in items)


def command(*args: bytes) -> bytes:
    return array(*args)


def test_a_set_in_another_order_is_no_divergence_and_is_counted() -> None:
    h = resp()
    h(ClientData(command(b"SMEMBERS", b"s") + command(b"GET", b"k")))
    h(UpstreamData(P, array(b"a", b"b", b"c") + bulk(b"v")))
    h(UpstreamData(R, array(b"c", b"a", b"b") + bulk(b"v")))
    assert not h.reports("divergence")
    [allowed] = h.reports("allowed")
    assert allowed.name == R and allowed.detail == "SMEMBERS"
    assert h.written[CLIENT] == array(b"a", b"b", b"c") + bulk(b"v")
    assert h.session.matched(R)
    assert h.session.out(R) == len(array(b"c", b"a", b"b") + bulk(b"v"))


def test_an_exact_reply_that_differs_is_a_divergence_named_by_its_request() -> None:
    h = resp()
    h(ClientData(command(b"SMEMBERS", b"s") + command(b"GET", b"k")))
    h(UpstreamData(P, array(b"a", b"b") + bulk(b"value-1")))
    h(UpstreamData(R, array(b"b", b"a") + bulk(b"value-2")))
    [report] = h.reports("divergence")
    assert report.detail.startswith("reply 2 to GET differs at its byte 10:"), report.detail
    assert '"1\\r\\n"' in report.detail and '"2\\r\\n"' in report.detail
    assert R in h.stale(), "divergence = stale is the default"


def test_a_set_with_other_members_is_a_divergence_that_names_them() -> None:
    h = resp()
    h(ClientData(command(b"SMEMBERS", b"s")))
    h(UpstreamData(P, array(b"a", b"b")))
    h(UpstreamData(R, array(b"b", b"x")))
    [report] = h.reports("divergence")
    assert report.detail.startswith("reply 1 to SMEMBERS differs (compared in any order)")
    assert 'only the primary\'s: "a"' in report.detail and 'only r\'s: "x"' in report.detail


def test_an_ignored_reply_of_another_length_shifts_the_comparison_after_it() -> None:
    h = resp()
    h(ClientData(command(b"INFO") + command(b"GET", b"k") + command(b"GET", b"j")))
    h(UpstreamData(P, bulk(b"uptime:12") + bulk(b"one")))
    h(UpstreamData(R, bulk(b"uptime:123456") + bulk(b"one") + bulk(b"tw")))  # replica ahead
    h(UpstreamData(P, bulk(b"two")))
    [report] = h.reports("divergence")
    assert report.detail.startswith("reply 3 to GET differs"), report.detail


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    count=st.integers(1, 1500),
    per_chunk=st.integers(1, 64),
    mode=st.sampled_from(["async", "sync"]),
    hot=st.booleans(),
    behind=st.sampled_from([0, 1]),
)
def test_a_divergence_names_its_reply_however_many_replies_the_window_passed(
    seed: int, count: int, per_chunk: int, mode: str, hot: bool, behind: int
) -> None:
    """The session forgets the replies the window has passed now and then (past
    hundreds of them); a divergence still names the right reply and byte. The
    replica is a chunk behind the primary, or level with it after each chunk (the
    window is then past every reply when they are forgotten)."""
    rng = random.Random(seed)
    names = [rng.choice([b"GET", b"SET", b"INCR", b"INFO"]) for _ in range(count)]
    sizes = {b"GET": [0, 5, 300], b"SET": [], b"INCR": [], b"INFO": [2, 400]}
    replies = [
        bulk(b"v" * rng.choice(sizes[n]))
        if sizes[n]
        else (b"+OK\r\n" if n == b"SET" else b":7\r\n")
        for n in names
    ]
    exact = [i for i, n in enumerate(names) if n != b"INFO"]  # (INFO's reply may differ)
    if not exact:
        return
    wrong = rng.choice(exact)
    byte = rng.randrange(len(replies[wrong]))
    theirs = list(replies)
    theirs[wrong] = (
        replies[wrong][:byte] + bytes([replies[wrong][byte] ^ 1]) + replies[wrong][byte + 1 :]
    )
    h = resp(mode=mode, hot=hot)
    h(ClientData(b"".join(command(n, b"k") for n in names)))
    chunks = range(0, count + per_chunk, per_chunk)
    lag = behind * per_chunk
    for i in chunks:
        if i < count:
            h(UpstreamData(P, b"".join(replies[i : i + per_chunk])))
        if lag <= i < count + lag:
            h(UpstreamData(R, b"".join(theirs[i - lag : i - lag + per_chunk])))
        if h.reports("divergence"):
            break
    [report] = h.reports("divergence")
    what = f"reply {wrong + 1} to {names[wrong].decode()} differs at its byte {byte}:"
    assert report.detail.startswith(what), (report.detail, what)


@pytest.mark.parametrize("crash", ["reset", "down", "eof"])
def test_takeover_after_an_ignored_reply_continues_with_the_replicas_next_reply(
    crash: str,
) -> None:
    h = resp()
    h(ClientData(command(b"HELLO", b"3") + command(b"GET", b"k")))
    h(UpstreamData(P, bulk(b"id:7") + bulk(b"v")))  # the client has both replies
    h(UpstreamData(R, bulk(b"id:1234")))  # the replica is behind: one reply so far
    crash_event: Event = {
        "reset": UpstreamClosed(P, "ConnectionResetError"),
        "down": PrimaryDown("health"),
        "eof": UpstreamEof(P),
    }[crash]
    h(crash_event)
    if crash != "down":
        assert StartTimer(Timer.PRIMARY_EOF, 0.2) in h.actions
        assert h(TimerFired(Timer.PRIMARY_EOF)) == [CheckPrimary(P)]
        h(PrimaryChecked(P, alive=False, reason="Connection refused"))
    assert h.session.primary == R
    [promote] = [a for a in h.actions if isinstance(a, Promote)]
    assert (promote.name, promote.old, promote.kind) == (R, P, "midsession")
    h(UpstreamData(R, bulk(b"v")))  # repeats what the client has: compared, not sent
    h(ClientData(command(b"GET", b"x")))
    h(UpstreamData(R, bulk(b"new")))
    assert h.written[CLIENT] == bulk(b"id:7") + bulk(b"v") + bulk(b"new")
    assert not h.reports("divergence")


def test_sync_mode_releases_a_reply_once_the_replica_sent_an_equivalent_one() -> None:
    h = resp(mode="sync")
    h(ClientData(command(b"SMEMBERS", b"s")))
    h(UpstreamData(P, array(b"a", b"b")))
    assert not h.written[CLIENT]
    h(UpstreamData(R, b"*2\r\n$1\r\nb\r\n"))
    assert not h.written[CLIENT], "half a reply vouches for nothing"
    h(UpstreamData(R, bulk(b"a")[:-1]))
    assert not h.written[CLIENT]
    h(UpstreamData(R, b"\n"))
    assert h.written[CLIENT] == array(b"a", b"b")
    assert not h.reports("divergence")


def test_sync_mode_streams_an_ignored_reply_once_the_replica_began_its_own() -> None:
    h = resp(mode="sync")
    h(ClientData(command(b"INFO")))
    h(UpstreamData(P, b"$10\r\n0123"))
    assert not h.written[CLIENT]
    h(UpstreamData(R, b"$"))  # it has run the request: it answers
    assert h.written[CLIENT] == b"$10\r\n0123"
    h(UpstreamData(P, b"456789\r\n"))
    assert h.written[CLIENT] == bulk(b"0123456789")
    h(UpstreamData(R, b"2\r\nab\r\n"))
    assert not h.reports("divergence")


def test_sync_takeover_where_the_old_primary_stopped_inside_an_unsent_reply() -> None:
    h = resp(mode="sync")
    h(ClientData(command(b"GET", b"k") + command(b"SMEMBERS", b"s")))
    h(UpstreamData(P, bulk(b"v") + b"*2\r\n$1\r\na"))  # dies inside its second reply
    h(UpstreamData(R, bulk(b"v") + b"*2\r\n$1\r\nb\r\n"))
    assert h.written[CLIENT] == bulk(b"v")
    h(UpstreamClosed(P, "ConnectionResetError"))
    h(TimerFired(Timer.PRIMARY_EOF))
    h(PrimaryChecked(P, alive=False, reason="refused"))
    assert h.session.primary == R
    h(UpstreamData(R, b"$1\r\na\r\n"))
    assert h.written[CLIENT] == bulk(b"v") + array(b"b", b"a"), "the replica's version, whole"
    assert not h.reports("divergence")


def test_async_takeover_is_refused_inside_a_reply_the_replica_answers_otherwise() -> None:
    h = resp()
    h(ClientData(command(b"INFO")))
    h(UpstreamData(P, b"$10\r\n01234"))  # the client has half of the primary's version
    h(UpstreamData(R, b"$3\r\nab"))
    h(PrimaryDown("health"))
    assert h.session.outcome == "primary_failed"
    assert not h.of(Promote)
    assert h.written[CLIENT] == b"$10\r\n01234"


def test_a_reply_that_answers_no_request_makes_the_session_compare_bytes() -> None:
    h = resp()
    h(ClientData(command(b"SMEMBERS", b"s")))
    h(UpstreamData(P, array(b"a", b"b") + b"+surprise\r\n" + array(b"x", b"y")))
    h(UpstreamData(R, array(b"b", b"a") + b"+surprise\r\n" + array(b"y", b"x")))
    [report] = h.reports("divergence")  # the unpaired part is compared as bytes
    assert "output differs at offset" in report.detail


def test_pubsub_is_not_modelled_and_falls_back_to_bytes() -> None:
    h = resp()
    h(ClientData(command(b"SUBSCRIBE", b"ch")))
    h(UpstreamData(P, array(b"subscribe", b"ch") + b"*3\r\n"))
    h(UpstreamData(R, array(b"subscribe", b"ch") + b"*3\r\n"))
    assert not h.reports("divergence")
    assert not h.session.frames_input()


def test_the_server_ending_a_session_is_not_a_failover() -> None:
    """A too-big request: each server answers an error and closes, the replica later."""
    h = resp()
    h(ClientData(b"X" * 100))
    err = b"-ERR Protocol error: too big inline request\r\n"
    h(UpstreamData(P, err))
    h(UpstreamClosed(P, "ConnectionResetError"))
    h(ClientData(b"Y" * 10))  # held: the primary never took it
    assert h.written[R] == b"X" * 100
    h(UpstreamData(R, err))
    h(UpstreamClosed(R, "ConnectionResetError"))
    assert not h.of(Promote) and not h.stale()
    assert h.session.outcome == "server_closed"
    assert h.written[CLIENT] == err


def test_an_idle_session_whose_primary_died_is_taken_over() -> None:
    h = resp()
    h(ClientData(command(b"PING")))
    h(UpstreamData(P, b"+PONG\r\n"))
    h(UpstreamData(R, b"+PONG\r\n"))
    h(UpstreamEof(P))  # a killed process's socket sends FIN
    h(TimerFired(Timer.PRIMARY_EOF))
    assert h.actions[-1] == CheckPrimary(P)
    h(PrimaryChecked(P, alive=False, reason="Connection refused"))
    assert h.session.primary == R
    h(ClientData(command(b"PING")))
    assert h.written[R].endswith(command(b"PING") * 2)
    h(UpstreamData(R, b"+PONG\r\n"))
    assert h.written[CLIENT] == b"+PONG\r\n" * 2


def test_a_primary_that_closes_on_purpose_is_not_taken_over() -> None:
    h = resp()
    h(ClientData(command(b"CLIENT", b"KILL", b"ID", b"7")))
    h(UpstreamData(P, b"+OK\r\n"))
    h(UpstreamData(R, b"-ERR No such client\r\n"))  # ignored: CLIENT * may differ
    h(UpstreamEof(P))
    h(TimerFired(Timer.PRIMARY_EOF))
    h(PrimaryChecked(P, alive=True))
    assert h.session.primary == P and not h.of(Promote) and not h.stale()
    assert not h.reports("divergence")


# ------------------------------------------------------------------ properties

#: (request, primary's reply, an equivalent reply from another server) makers.
Step = tuple[bytes, bytes, bytes]


@st.composite
def steps(draw: st.DrawFn) -> Step:
    kind = draw(st.sampled_from(["get", "info", "smembers", "hello", "ping"]))
    if kind == "get":
        value = draw(st.binary(max_size=20))
        return command(b"GET", b"k"), bulk(value), bulk(value)
    if kind == "info":
        a = draw(st.binary(max_size=30))
        b = draw(st.binary(max_size=30))
        return command(b"INFO"), bulk(a), bulk(b)
    if kind == "hello":
        ours, theirs = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
        return command(b"HELLO", b"3"), b":%d\r\n" % ours, b":%d\r\n" % theirs
    if kind == "ping":
        return b"PING\r\n", b"+PONG\r\n", b"+PONG\r\n"
    members = draw(st.lists(st.binary(min_size=1, max_size=5), unique=True, max_size=5))
    shuffled = draw(st.permutations(members))
    return command(b"SMEMBERS", b"s"), array(*members), array(*shuffled)


IGNORED = (command(b"INFO"), command(b"HELLO", b"3"))


def _split_replies(stream: bytes) -> tuple[list[bytes], bytes]:
    """Whole replies, and what is left (the start of one more)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(stream):
        end = RespParser().feed(stream, pos)
        if end < 0:
            return out, stream[pos:]
        out.append(stream[pos:end])
        pos = end
    return out, b""


#: What a session property draws besides its script and its cuts (see _schedule and
#: _play): the order of the events, where (if anywhere) and how the primary fails, the
#: mode, and whether the driver's fast paths are taken.
SCHEDULES = {
    "order": st.randoms(use_true_random=False),
    "crash_at": st.one_of(st.none(), st.integers(0, 40)),
    "crash": st.sampled_from(["reset", "down", "eof"]),
    "mode": st.sampled_from(["async", "sync"]),
    "hot": st.booleans(),
}


@settings(max_examples=300, deadline=None)
@given(
    script=st.lists(steps(), min_size=1, max_size=8),
    cuts=st.lists(st.lists(st.integers(1, 25), max_size=12), min_size=3, max_size=3),
    **SCHEDULES,
)
def test_replies_that_differ_as_the_rules_allow_never_stop_replication_or_takeover(
    script: list[Step],
    cuts: list[list[int]],
    order: random.Random,
    crash_at: int | None,
    crash: str,
    mode: str,
    hot: bool,
) -> None:
    """Whatever the chunking and the order of events, and wherever the primary fails:
    no divergence, nobody stale, and the client gets each reply whole, once, in order,
    as one server or the other answered it (never a mix within a reply)."""
    h = connected(
        (P, "primary"),
        (R, "replica"),
        framing=RespFraming(RespRules()),
        hot=hot,
        mode=mode,  # type: ignore[arg-type]
    )

    def vouched(replica_sent: bytes) -> int:
        # Sync mode: the client has no reply the replica has not answered too (begun
        # to answer, where the reply may differ in any way: INFO, HELLO).
        seen, tail = _split_replies(replica_sent)
        return len(seen) + (1 if tail and script[len(seen)][0] in IGNORED else 0)

    events = _schedule(script, cuts, order)
    _play(h, script, events, crash_at, crash, mode == "sync", _split_replies, vouched)


def _crash(h: Harness, how: str) -> None:
    if how == "down":
        h(PrimaryDown("health"))
        return
    h(UpstreamClosed(P, "ConnectionResetError") if how == "reset" else UpstreamEof(P))
    _answer_checks(h)


def _reply_bounds(script: list[Step]) -> dict[str, list[tuple[int, int]]]:
    """For each server: (bytes of request needed, end of the reply), per step."""
    out: dict[str, list[tuple[int, int]]] = {P: [], R: []}
    req = 0
    ends = {P: 0, R: 0}
    for request, ours, theirs in script:
        req += len(request)
        for name, reply in ((P, ours), (R, theirs)):
            start = ends[name]
            ends[name] += len(reply)
            out[name].append((req, start))
    return out


def _may_answer(
    answered: int, size: int, bounds: list[tuple[int, int]], sent: int, script: list[Step]
) -> bool:
    """Whether a server may send bytes [answered, answered + size): every reply they
    touch answers a request the client has sent whole."""
    return all(not (start < answered + size and needed > sent) for needed, start in bounds)


def _schedule(
    script: list[Step], cuts: list[list[int]], order: random.Random
) -> list[tuple[str, bytes]]:
    """The client's and both servers' chunks in an order where no server answers a
    request before the client sent it whole."""
    requests = b"".join(s[0] for s in script)
    ours = b"".join(s[1] for s in script)
    theirs = b"".join(s[2] for s in script)
    queues = {"c": _cut(requests, cuts[0]), P: _cut(ours, cuts[1]), R: _cut(theirs, cuts[2])}
    sent = 0
    events: list[tuple[str, bytes]] = []
    answered = {P: 0, R: 0}
    bounds = _reply_bounds(script)
    while any(queues.values()):
        ready = [k for k, q in queues.items() if q and (k == "c" or _may_answer(
            answered[k], len(q[0]), bounds[k], sent, script))]  # fmt: skip
        name = order.choice(sorted(ready))
        chunk = queues[name].pop(0)
        events.append((name, chunk))
        if name == "c":
            sent += len(chunk)
        else:
            answered[name] += len(chunk)
    return events


def _play(
    h: Harness,
    script: list[Step],
    events: list[tuple[str, bytes]],
    crash_at: int | None,
    crash: str,
    sync: bool,
    split: Callable[[bytes], tuple[list[bytes], bytes]],
    vouched: Callable[[bytes], int],
) -> bool:
    """Feed ``events`` to ``h``, failing the primary (``crash``) before event ``crash_at``
    if given, and hold the session to the guarantees: in sync mode, the client never
    has more whole replies (by ``split``) than ``vouched`` says the replica's output
    vouches for; at the end, no divergence, nobody stale, and each reply whole, once,
    in order, as one server or the other sent it. Returns whether the primary failed."""
    crashed = False
    replica_sent = b""
    for i, (name, chunk) in enumerate(events):
        if crash_at is not None and i == crash_at and not crashed:
            crashed = True
            _crash(h, crash)
        if name == "c":
            h(ClientData(chunk))
        elif not (crashed and name == P) and h.session.in_session(name):
            h(UpstreamData(name, chunk))
            if name == R:
                replica_sent += chunk
        _answer_checks(h)
        if sync and not crashed and h.session.matched(R) and h.session.in_session(R):
            delivered, _ = split(bytes(h.written[CLIENT]))
            assert len(delivered) <= vouched(replica_sent), (delivered, replica_sent)
    if crash_at is not None and not crashed:
        crashed = True
        _crash(h, crash)
    if crashed and not h.session.finished and h.session.primary == P:
        h(TimerFired(Timer.PRIMARY_EOF))  # (the replica kept its connection: a check)
        _answer_checks(h)
    replies, tail = split(bytes(h.written[CLIENT]))
    assert not h.reports("divergence"), h.reports("divergence")
    assert not h.stale()
    for i, reply in enumerate(replies):
        assert reply in (script[i][1], script[i][2]), (i, reply, script[i])
    if tail:
        # Cut short: only where the primary failed inside a reply nobody could finish.
        assert h.session.outcome == "primary_failed", (tail, h.session.outcome)
        n = len(replies)
        assert script[n][1].startswith(tail) or script[n][2].startswith(tail)
    else:
        assert h.session.primary == R or not crashed, "the replica took over"
        assert len(replies) == len(script), "every reply arrives"
    return crashed


def test_after_monitor_each_servers_output_is_its_own_and_not_compared() -> None:
    h = resp()
    h(ClientData(command(b"GET", b"k") + command(b"MONITOR")))
    h(UpstreamData(P, bulk(b"v") + b'+OK\r\n+1700000000.123 [0 127.0.0.1:5] "GET"\r\n'))
    h(UpstreamData(R, bulk(b"v") + b'+OK\r\n+1700000000.999 [0 127.0.0.1:9] "GET"\r\n'))
    assert not h.reports("divergence") and not h.stale()
    [lost] = h.reports("compare_lost")
    assert lost.name == R
    # What came before MONITOR is still compared.
    h = resp()
    h(ClientData(command(b"GET", b"k") + command(b"MONITOR")))
    h(UpstreamData(P, bulk(b"v") + b"+OK\r\n"))
    h(UpstreamData(R, bulk(b"w") + b"+OK\r\n"))
    [report] = h.reports("divergence")
    assert report.detail.startswith("reply 1 to GET differs")


def test_a_replica_ahead_into_monitor_is_let_go_as_the_primary_gets_there() -> None:
    # The replica's +OK comes first, whole: when the primary's arrives, the streams
    # are each server's own from there, and sync mode stops waiting for the replica.
    h = resp(mode="sync")
    h(ClientData(command(b"MONITOR")))
    h(UpstreamData(R, b"+OK\r\n"))
    h(UpstreamData(P, b"+OK\r\n"))
    [lost] = h.reports("compare_lost")
    assert lost.name == R
    line = b'+1700000000.123 [0 127.0.0.1:5] "GET"\r\n'
    h(UpstreamData(P, line))
    assert h.written[CLIENT] == b"+OK\r\n" + line, "not held for the replica"
    assert not h.reports("divergence") and not h.stale()


# ------------------------------------------------------------------ other protocols


def _pg_msg(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


_PG_PARAMS = b"user\x00app\x00database\x00db\x00\x00"
PG_STARTUP = (8 + len(_PG_PARAMS)).to_bytes(4, "big") + (3 << 16).to_bytes(4, "big") + _PG_PARAMS
PG_READY = _pg_msg(b"Z", b"I")
PG_FATAL = _pg_msg(b"E", b"SFATAL\x00VFATAL\x00C28000\x00Mpassword authentication failed\x00\x00")


def pg_login(key: bytes) -> bytes:
    return _pg_msg(b"R", bytes(4)) + _pg_msg(b"K", key) + PG_READY


def postgres_session(**limits: Any) -> Harness:
    from replicaproxy.core.postgres import PgFraming

    return connected((P, "primary"), (R, "replica"), framing=PgFraming(frozenset()), **limits)


def test_a_login_both_servers_refuse_is_passed_on_and_not_a_failover() -> None:
    h = postgres_session()
    h(ClientData(PG_STARTUP))
    refusal = PG_FATAL
    h(UpstreamData(P, refusal))
    assert not h.written[CLIENT], "its last words wait: did the server end it, or fail?"
    h(UpstreamData(R, refusal))
    h(UpstreamEof(P))
    h(UpstreamEof(R))
    assert h.actions[-1] == CheckPrimary(P) and not h.written[CLIENT]
    h(PrimaryChecked(P, alive=True))  # it answers: it refused the login, and is up
    assert h.written[CLIENT] == refusal
    assert not h.of(Promote) and not h.stale() and not h.reports("divergence")
    assert h.session.outcome == "server_closed"


def test_a_replica_that_refuses_the_login_the_primary_accepted_is_stale() -> None:
    h = postgres_session()
    h(ClientData(PG_STARTUP))
    h(UpstreamData(P, pg_login(b"\x00\x00\x00\x01key1")))
    h(UpstreamData(R, PG_FATAL))
    h(UpstreamEof(R))
    assert R in h.stale() and h.reports("divergence")
    assert h.written[CLIENT] == pg_login(b"\x00\x00\x00\x01key1")


def test_a_primary_that_dies_after_the_login_is_taken_over() -> None:
    h = postgres_session()
    h(ClientData(PG_STARTUP))
    h(UpstreamData(P, pg_login(b"\x00\x00\x00\x01key1")))
    h(UpstreamData(R, pg_login(b"\x00\x00\x00\x02key2")))  # its own key: no divergence
    assert [r.detail for r in h.reports("key")] == [b"\x00\x00\x00\x01key1".hex()]
    assert [(r.name, r.detail) for r in h.reports("own_key")] == [
        (R, b"\x00\x00\x00\x02key2".hex())
    ]
    h(UpstreamClosed(P, "ConnectionResetError"))
    h(TimerFired(Timer.PRIMARY_EOF))
    h(PrimaryChecked(P, alive=False, reason="Connection refused"))
    assert h.session.primary == R
    query = _pg_msg(b"Q", b"select 1\x00")
    h(ClientData(query))
    done = _pg_msg(b"C", b"SELECT 1\x00") + PG_READY
    h(UpstreamData(R, done))
    assert h.written[CLIENT] == pg_login(b"\x00\x00\x00\x01key1") + done
    assert not h.reports("divergence")


def test_a_fatal_error_from_a_primary_that_then_fails_is_not_sent() -> None:
    """The primary is shutting down (FATAL: terminating connection) and the replica is
    not: the client gets the replica's answer, not the last words of a dying server."""
    h = postgres_session()
    h(ClientData(PG_STARTUP))
    h(UpstreamData(P, pg_login(b"\x00\x00\x00\x01key1")))
    h(UpstreamData(R, pg_login(b"\x00\x00\x00\x02key2")))
    h(ClientData(_pg_msg(b"Q", b"select 1\x00")))
    h(UpstreamData(P, PG_FATAL))
    h(UpstreamEof(P))
    h(TimerFired(Timer.PRIMARY_EOF))
    h(PrimaryChecked(P, alive=False, reason="Connection refused"))
    done = _pg_msg(b"C", b"SELECT 1\x00") + PG_READY
    h(UpstreamData(R, done))
    assert h.session.primary == R
    assert h.written[CLIENT] == pg_login(b"\x00\x00\x00\x01key1") + done


def test_an_http_body_that_ends_with_the_close_is_compared_whole() -> None:
    from replicaproxy.core.http import HttpFraming

    h = connected((P, "primary"), (R, "replica"), framing=HttpFraming(frozenset({b"date"})))
    h(ClientData(b"GET / HTTP/1.0\r\n\r\n"))
    h(UpstreamData(P, b"HTTP/1.0 200 OK\r\nDate: 1\r\n\r\nbody"))
    h(UpstreamData(R, b"HTTP/1.0 200 OK\r\nDate: 2\r\n\r\nbody"))
    h(UpstreamEof(R))
    h(UpstreamEof(P))
    h(TimerFired(Timer.PRIMARY_EOF))
    h(PrimaryChecked(P, alive=True))
    assert h.written[CLIENT] == b"HTTP/1.0 200 OK\r\nDate: 1\r\n\r\nbody"
    assert not h.reports("divergence") and not h.stale() and not h.of(Promote)
    h2 = connected((P, "primary"), (R, "replica"), framing=HttpFraming(frozenset({b"date"})))
    h2(ClientData(b"GET / HTTP/1.0\r\n\r\n"))
    h2(UpstreamData(P, b"HTTP/1.0 200 OK\r\n\r\nbody"))
    h2(UpstreamData(R, b"HTTP/1.0 200 OK\r\n\r\nbodY"))
    h2(UpstreamEof(R))
    h2(UpstreamEof(P))
    assert h2.reports("divergence") and R in h2.stale()


def test_last_words_between_replies_are_held_and_a_dead_primary_taken_over() -> None:
    """A postmaster dies: its backend says FATAL while the client is between queries."""
    h = postgres_session()
    h(ClientData(PG_STARTUP))
    h(UpstreamData(P, pg_login(b"\x00\x00\x00\x01key1")))
    h(UpstreamData(R, pg_login(b"\x00\x00\x00\x02key2")))
    h(UpstreamData(P, PG_FATAL))
    h(UpstreamEof(P))
    assert h.written[CLIENT] == pg_login(b"\x00\x00\x00\x01key1")
    h(TimerFired(Timer.PRIMARY_EOF))
    h(PrimaryChecked(P, alive=False, reason="Connection refused"))
    assert h.session.primary == R
    query = _pg_msg(b"Q", b"select 1\x00")
    h(ClientData(query))
    done = _pg_msg(b"C", b"SELECT 1\x00") + PG_READY
    h(UpstreamData(R, done))
    assert h.written[CLIENT] == pg_login(b"\x00\x00\x00\x01key1") + done


def test_the_view_marking_the_primary_down_during_a_check_is_a_takeover() -> None:
    """Another session's failover reaches one still asking whether its primary failed."""
    h = postgres_session()
    h(ClientData(PG_STARTUP))
    h(UpstreamData(P, pg_login(b"\x00\x00\x00\x01key1")))
    h(UpstreamData(R, pg_login(b"\x00\x00\x00\x02key2")))
    h(UpstreamData(P, PG_FATAL))
    h(UpstreamClosed(P, "ConnectionResetError"))
    h(PrimaryDown("primary is stale in view epoch 1"))
    assert h.session.primary == R and not h.reports("connect_failed")
    query = _pg_msg(b"Q", b"select 1\x00")
    h(ClientData(query))
    done = _pg_msg(b"C", b"SELECT 1\x00") + PG_READY
    h(UpstreamData(R, done))
    assert h.written[CLIENT] == pg_login(b"\x00\x00\x00\x01key1") + done


# ------------------------------------------------------ HTTP: compared in place
#
# HTTP responses (and PostgreSQL replies) are compared in place, byte for byte,
# and collected whole only from a difference on (Expect.in_place): the same
# guarantees must hold wherever the difference falls and however bytes are cut.


def _http(date: bytes, body: bytes, status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nDate: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        date,
        len(body),
        body,
    )


@st.composite
def http_steps(draw: st.DrawFn) -> Step:
    target = draw(st.sampled_from([b"/", b"/a", b"/items?x=1"]))
    body = draw(st.binary(max_size=30))
    status = draw(st.sampled_from([b"200 OK", b"404 Not Found"]))
    ours = draw(st.sampled_from([b"Tue, 01 Dec 2026 10:00:00 GMT", b"1"]))
    theirs = draw(st.sampled_from([ours, b"Tue, 01 Dec 2026 10:00:01 GMT", b"22"]))
    request = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target
    return request, _http(ours, body, status), _http(theirs, body, status)


def _split_http(stream: bytes) -> tuple[list[bytes], bytes]:
    """Whole responses (each with a Content-Length), and the start of one more."""
    out: list[bytes] = []
    pos = 0
    while pos < len(stream):
        head = stream.find(b"\r\n\r\n", pos)
        if head < 0:
            break
        length = int(stream[pos:head].split(b"Content-Length: ")[1].split(b"\r\n")[0])
        end = head + 4 + length
        if end > len(stream):
            break
        out.append(stream[pos:end])
        pos = end
    return out, stream[pos:]


@settings(max_examples=300, deadline=None)
@given(
    script=st.lists(http_steps(), min_size=1, max_size=6),
    cuts=st.lists(st.lists(st.integers(1, 40), max_size=12), min_size=3, max_size=3),
    **SCHEDULES,
)
def test_http_responses_whose_date_differs_never_stop_replication_or_takeover(
    script: list[Step],
    cuts: list[list[int]],
    order: random.Random,
    crash_at: int | None,
    crash: str,
    mode: str,
    hot: bool,
) -> None:
    """As for RESP: whatever the chunking, the order of events and where the primary
    fails, a Date that differs (in value or in length) is no divergence, and the client
    gets each response whole, once, in order, as one server or the other sent it."""
    from replicaproxy.core.http import HttpFraming

    h = connected(
        (P, "primary"),
        (R, "replica"),
        framing=HttpFraming(frozenset({b"date"})),
        hot=hot,
        mode=mode,  # type: ignore[arg-type]
    )
    # Sync mode: no response reaches the client whole before the replica's.
    crashed = _play(
        h,
        script,
        _schedule(script, cuts, order),
        crash_at,
        crash,
        mode == "sync",
        _split_http,
        lambda replica_sent: len(_split_http(replica_sent)[0]),
    )
    if not crashed:
        differing = sum(1 for _, ours, theirs in script if ours != theirs)
        assert len(h.reports("allowed")) == differing


@settings(max_examples=200, deadline=None)
@given(
    script=st.lists(http_steps(), min_size=1, max_size=5),
    bad=st.integers(0, 4),
    flip=st.integers(0, 1000),
    cuts=st.lists(st.lists(st.integers(1, 40), max_size=12), min_size=3, max_size=3),
    order=st.randoms(use_true_random=False),
    mode=st.sampled_from(["async", "sync"]),
    hot=st.booleans(),
)  # fmt: skip
def test_an_http_response_that_differs_outside_its_date_is_a_divergence(
    script: list[Step],
    bad: int,
    flip: int,
    cuts: list[list[int]],
    order: random.Random,
    mode: str,
    hot: bool,
) -> None:
    """A replica's response that differs anywhere but in Date (status, a header, one
    body byte) is a divergence and the replica stale, wherever the chunks are cut."""
    from replicaproxy.core.http import HttpFraming

    bad %= len(script)
    request, ours, theirs = script[bad]
    body = ours[ours.index(b"\r\n\r\n") + 4 :]
    date = theirs.split(b"Date: ")[1].split(b"\r\n")[0]
    if body:
        at = flip % len(body)
        wrong = body[:at] + bytes([body[at] ^ 1]) + body[at + 1 :]
        theirs = _http(date, wrong, b"200 OK" if b" 200 " in ours else b"404 Not Found")
    else:
        theirs = _http(date, body, b"500 Internal Server Error")
    script = [*script[:bad], (request, ours, theirs), *script[bad + 1 :]]
    h = connected(
        (P, "primary"),
        (R, "replica"),
        framing=HttpFraming(frozenset({b"date"})),
        hot=hot,
        mode=mode,  # type: ignore[arg-type]
    )
    for name, chunk in _schedule(script, cuts, order):
        if name == "c":
            h(ClientData(chunk))
        elif h.session.in_session(name):
            h(UpstreamData(name, chunk))
    assert h.reports("divergence"), "the difference was seen"
    assert R in h.stale()
    assert bytes(h.written[CLIENT]) == b"".join(s[1] for s in script)


def _http_session(mode: str = "async") -> Harness:
    from replicaproxy.core.http import HttpFraming

    return connected(
        (P, "primary"),
        (R, "replica"),
        framing=HttpFraming(frozenset({b"date"})),
        mode=mode,  # type: ignore[arg-type]
    )


def test_sync_takeover_inside_a_response_compared_in_place_gives_the_replicas_whole() -> None:
    """The old primary stopped inside a response the client has none of; the replica
    had matched its first bytes in place: the client gets the replica's own version."""
    h = _http_session("sync")
    h(ClientData(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    ours, theirs = _http(b"1", b"hello"), _http(b"22", b"hello")
    h(UpstreamData(P, ours[:30]))
    h(UpstreamData(R, theirs[:20]))  # the same bytes so far (before the Date)
    assert h.written[CLIENT] == b"", "nothing of a response before the replica's is whole"
    h(UpstreamClosed(P, "ConnectionResetError"))
    h(TimerFired(Timer.PRIMARY_EOF))
    h(PrimaryChecked(P, alive=False, reason="refused"))
    assert h.session.primary == R
    h(UpstreamData(R, theirs[20:]))
    assert h.written[CLIENT] == theirs
    assert not h.reports("divergence")


def test_async_takeover_inside_a_response_compared_in_place_goes_on_byte_for_byte() -> None:
    """The client has part of a response; the replica matched it in place so far and
    finishes it: the same connection, the response whole."""
    h = _http_session()
    h(ClientData(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    ours = _http(b"1", b"hello")
    h(UpstreamData(P, ours[:40]))
    h(UpstreamData(R, ours[:45]))
    h(PrimaryDown("health"))
    assert h.session.primary == R
    h(UpstreamData(R, ours[45:]))
    assert h.written[CLIENT] == ours
    assert not h.reports("divergence")


def test_a_response_differing_beyond_compare_window_from_its_start_cannot_be_compared() -> None:
    """A response compared in place is kept from its start only within compare_window:
    a difference further in is reported as not comparable, never passed as equal."""
    from replicaproxy.core.http import HttpFraming

    for mode in ("async", "sync"):
        h = connected(
            (P, "primary"),
            (R, "replica"),
            framing=HttpFraming(frozenset({b"date"})),
            compare_window=128,
            mode=mode,  # type: ignore[arg-type]
        )
        ours = _http(b"1", b"x" * 300)
        theirs = ours[:-1] + b"y"  # differs ~340 bytes from the response's start
        h(ClientData(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        for at in range(0, len(ours), 50):  # the replica keeps pace, 50 bytes at a time
            h(UpstreamData(P, ours[at : at + 50]))
            h(UpstreamData(R, theirs[at : at + 50]))
        assert not h.reports("allowed") and not h.reports("divergence")
        if mode == "async":
            [lost] = h.reports("compare_lost")
            assert "longer than compare_window" in lost.detail, lost.detail
            assert not h.stale()
        else:
            assert R in h.stale(), "sync mode: it cannot vouch for the response"
