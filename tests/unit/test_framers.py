"""Tier 1: the HTTP, PostgreSQL and memcached framers and their rules.

Each framer by property (any split of a stream of replies frames the same as the
whole) and by example (what each protocol's rules let differ, and what not).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from replicaproxy.core import postgres
from replicaproxy.core.framing import GARBAGE, MORE, Expect, Framing
from replicaproxy.core.http import HttpExpect, HttpFraming, ignored
from replicaproxy.core.memcached import McFraming
from replicaproxy.core.postgres import PgFraming


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    out, rest = [], data
    for size in cuts:
        if not rest:
            break
        out.append(rest[:size])
        rest = rest[size:]
    return [*out, rest] if rest else out


def frame(
    framing: Framing, requests: bytes, replies: bytes, cuts: list[int], *, runs: bool = False
) -> list[int]:
    """Where each reply in ``replies`` ends, ``replies`` fed to ``framing`` in pieces.

    ``runs``: :meth:`Framing.run` is asked first between replies, as the session does
    (it frames what it can of a piece in one call); begin and feed frame the rest.
    """
    framing.request(requests)
    ends: list[int] = []
    offset = 0
    inside = False
    for piece in _pieces(replies, cuts):
        pos = 0
        while pos < len(piece):
            if not inside:
                if runs:
                    sizes: list[int] = []  # (of each reply it frames)
                    ran = framing.run(piece, pos, sizes, [])
                    assert (ran > pos) == bool(sizes) and sum(sizes) == ran - pos
                    if sizes:
                        end = offset + pos
                        for size in sizes:
                            end += size
                            ends.append(end)
                        pos = ran
                        if pos >= len(piece):
                            break
                expect = framing.begin(piece, pos)
                assert expect is not None, (piece, pos)
                inside = True
            end = framing.feed(piece, pos)
            assert end != GARBAGE, (piece, pos)
            if end == MORE:
                break
            ends.append(offset + end)
            inside = False
            pos = end
        offset += len(piece)
    return ends


def replies_of(framing: Framing, requests: bytes, replies: bytes) -> list[tuple[Expect, bytes]]:
    """Each reply, whole, with what it answers."""
    framing.request(requests)
    out = []
    pos = 0
    while pos < len(replies):
        expect = framing.begin(replies, pos)
        assert expect is not None
        end = framing.feed(replies, pos)
        assert end >= 0, (replies, pos, end)
        out.append((expect, replies[pos:end]))
        pos = end
    return out


cuts = st.lists(st.integers(1, 13), max_size=60)

# ------------------------------------------------------------------ HTTP

HEADERS = frozenset({b"date"})


def http_response(status: int, body: bytes, chunked: bool, extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 %d X\r\nServer: t\r\n" % status + extra
    if status in (204, 304) or 100 <= status < 200:
        return head + b"\r\n"
    if chunked:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:3], body[3:]) if c)
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


http_exchange = st.tuples(
    st.sampled_from([b"GET", b"HEAD", b"POST"]),
    st.sampled_from([200, 201, 204, 304, 404]),
    st.binary(max_size=20),
    st.booleans(),
)


def _http_pair(method: bytes, status: int, body: bytes, chunked: bool) -> tuple[bytes, bytes]:
    request = b"%s /x HTTP/1.1\r\nHost: h\r\n" % method
    if method == b"POST":
        request += b"Content-Length: 3\r\n\r\nabc"
    else:
        request += b"\r\n"
    response = http_response(status, body, chunked)
    if method == b"HEAD" and status not in (204, 304):
        # A HEAD's answer has the headers of a GET's, and no body.
        response = response[: response.index(b"\r\n\r\n") + 4]
    return request, response


@settings(max_examples=300)
@given(exchanges=st.lists(http_exchange, min_size=1, max_size=5), cuts=cuts)
def test_http_every_split_frames_the_same(
    exchanges: list[tuple[bytes, int, bytes, bool]], cuts: list[int]
) -> None:
    pairs = [_http_pair(*e) for e in exchanges]
    requests = b"".join(r for r, _ in pairs)
    responses = b"".join(r for _, r in pairs)
    whole = frame(HttpFraming(HEADERS), requests, responses, [])
    assert len(whole) == len(pairs) and whole[-1] == len(responses)
    assert frame(HttpFraming(HEADERS), requests, responses, cuts) == whole
    # Requests in pieces too: the same expectations, in order.
    framing = HttpFraming(HEADERS)
    for piece in _pieces(requests, cuts):
        framing.request(piece)
    assert [e.label for e in framing.pending] == [f"{m.decode()} /x" for m, *_ in exchanges]


def test_http_date_may_differ_other_headers_not() -> None:
    request = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    a = http_response(200, b"hi", False, b"Date: Tue, 01 Dec 2026 10:00:00 GMT\r\n")
    b = http_response(200, b"hi", False, b"Date: Tue, 01 Dec 2026 10:00:01 GMT\r\n")
    c = http_response(200, b"hi", False, b"Date: x\r\nEtag: 2\r\n")
    [(expect, _)] = replies_of(HttpFraming(HEADERS), request, a)
    assert expect.equivalent(a, b)
    assert not expect.equivalent(a, c)
    assert "header etag" in expect.difference(a, c)
    # Chunked and by length: the same body, the same answer.
    chunked = http_response(200, b"hello", True)
    assert expect.equivalent(http_response(200, b"hello", False), chunked)
    assert not expect.equivalent(
        http_response(200, b"hello", False), http_response(200, b"hellO", True)
    )
    assert "body" in expect.difference(
        http_response(200, b"a", False), http_response(200, b"b", False)
    )
    assert "status" in expect.difference(a, http_response(500, b"hi", False))


def test_http_ignore_headers_are_configurable() -> None:
    request = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    a = http_response(200, b"", False, b"X-Request-Id: 1\r\n")
    b = http_response(200, b"", False, b"X-Request-Id: 2\r\n")
    [(expect, _)] = replies_of(HttpFraming(ignored(["Date", "X-Request-Id"])), request, a)
    assert expect.equivalent(a, b)
    [(strict, _)] = replies_of(HttpFraming(HEADERS), request, a)
    assert not strict.equivalent(a, b)


def test_http_a_body_delimited_by_the_close_ends_at_finish() -> None:
    framing = HttpFraming(HEADERS)
    framing.request(b"GET / HTTP/1.0\r\n\r\n")  # (no Host: HTTP/1.0 has none)
    reply = b"HTTP/1.0 200 OK\r\n\r\nsome body"
    assert framing.begin(reply, 0) is not None
    assert framing.feed(reply, 0) == MORE
    assert framing.finish()


def test_http_upgrade_and_connect_stop_the_pairing() -> None:
    for request in (
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    ):
        framing = HttpFraming(HEADERS)
        framing.request(request)
        assert framing.deaf and framing.pending[0].label == request.split(b" HTTP")[0].decode()


def test_http_garbage_from_the_client_stops_the_pairing() -> None:
    framing = HttpFraming(HEADERS)
    framing.request(b"\x00\x01 not http\r\n\r\n")
    assert framing.deaf


def test_http_interim_responses_belong_to_the_final_one() -> None:
    request = b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx"
    reply = b"HTTP/1.1 100 Continue\r\n\r\n" + http_response(200, b"ok", False)
    [(_, whole)] = replies_of(HttpFraming(HEADERS), request, reply)
    assert whole == reply


# ------------------------------------------------------------------ PostgreSQL


def pg(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def pg_error(severity: bytes, text: bytes) -> bytes:
    return pg(b"E", b"S" + severity + b"\x00V" + severity + b"\x00C28000\x00M" + text + b"\x00\x00")


READY = pg(b"Z", b"I")
_PARAMS = b"user\x00postgres\x00database\x00db\x00\x00"
STARTUP = (8 + len(_PARAMS)).to_bytes(4, "big") + (3 << 16).to_bytes(4, "big") + _PARAMS


def startup_reply(pid: int, secret: int, params: bytes = b"") -> bytes:
    return (
        pg(b"R", (0).to_bytes(4, "big"))
        + pg(b"S", b"server_version\x0015.5\x00")
        + params
        + pg(b"K", pid.to_bytes(4, "big") + secret.to_bytes(4, "big"))
        + READY
    )


pg_message = st.one_of(
    st.binary(max_size=12).map(lambda b: pg(b"D", b)),
    st.binary(max_size=6).map(lambda b: pg(b"T", b)),
    st.just(pg(b"C", b"SELECT 1\x00")),
    st.just(pg(b"N", b"SNOTICE\x00Mhi\x00\x00")),
    st.just(pg(b"1", b"")),
    st.just(pg(b"2", b"")),
    st.just(pg_error(b"ERROR", b"boom")),
)


@settings(max_examples=300)
@given(replies=st.lists(st.lists(pg_message, max_size=5), min_size=1, max_size=5), cuts=cuts)
def test_postgres_every_split_frames_the_same(replies: list[list[bytes]], cuts: list[int]) -> None:
    requests = STARTUP + b"".join(pg(b"Q", b"select 1\x00") for _ in replies[1:])
    stream = startup_reply(1, 2) + b"".join(b"".join(r) + READY for r in replies[1:])
    whole = frame(PgFraming(frozenset()), requests, stream, [])
    assert len(whole) == len(replies) and whole[-1] == len(stream)
    assert frame(PgFraming(frozenset()), requests, stream, cuts) == whole


pg_request = st.one_of(
    # A Query's text as clients send it, and odd ones: empty, a NUL inside, longer
    # than the label keeps, no NUL at all.
    st.binary(max_size=12).map(lambda b: pg(b"Q", b + b"\x00")),
    st.binary(min_size=190, max_size=210).map(lambda b: pg(b"Q", b)),
    st.just(pg(b"Q", b"")),
    st.binary(max_size=12).map(lambda b: pg(b"P", b"\x00" + b + b"\x00\x00\x00")),
    st.just(pg(b"B", b"\x00\x00" + bytes(6))),
    st.just(pg(b"S", b"")),
    st.just(pg(b"F", bytes(10))),
    st.just(pg(b"d", b"1\n")),
    st.just(pg(b"c", b"")),
    st.just(pg(b"f", b"no\x00")),
)


@settings(max_examples=300)
@given(requests=st.lists(pg_request, max_size=8), cuts=cuts)
def test_postgres_every_split_of_the_requests_queues_the_same(
    requests: list[bytes], cuts: list[int]
) -> None:
    """Whole in one chunk or cut anywhere, the client's messages call for the same
    replies, with the same names and ends."""

    def queued(pieces: list[bytes]) -> list[tuple[bytes, str, bytes]]:
        framing = PgFraming(frozenset())
        for piece in pieces:
            framing.request(piece)
        pending = [e for e in framing.pending if isinstance(e, postgres.PgExpect)]
        return [(e.sql, e.name(), e.ends_at) for e in pending]

    stream = STARTUP + b"".join(requests)
    whole = queued([stream])
    assert len(whole) == 1 + sum(r[:1] in (b"Q", b"S", b"F", b"c", b"f") for r in requests)
    assert queued(_pieces(stream, cuts)) == whole
    assert queued([stream[i : i + 1] for i in range(len(stream))]) == whole


def test_postgres_extended_protocol_expects_a_reply_per_sync() -> None:
    framing = PgFraming(frozenset())
    framing.request(STARTUP)
    parse = pg(b"P", b"\x00select $1\x00\x00\x00")
    framing.request(parse + pg(b"B", b"\x00\x00" + bytes(6)) + pg(b"E", bytes(5)) + pg(b"S", b""))
    framing.request(pg(b"X", b""))  # Terminate: no reply
    assert [e.label for e in framing.pending] == ["startup", "Sync ('select $1')"]


def test_postgres_backend_keys_and_notices_may_differ_and_the_key_is_learned() -> None:
    a = startup_reply(100, 7)
    b = startup_reply(200, 9)
    [(expect, _)] = replies_of(PgFraming(frozenset()), STARTUP, a)
    assert expect.equivalent(a, b) and expect.learns
    assert expect.learn(a) == (100).to_bytes(4, "big") + (7).to_bytes(4, "big")
    with_notice = pg(b"N", b"SNOTICE\x00Mx\x00\x00") + READY
    assert PgFraming(frozenset())._expect("q").equivalent(READY, with_notice)


def test_postgres_parameters_are_ignored_only_when_configured() -> None:
    a = startup_reply(1, 1, pg(b"S", b"application_name\x00psql\x00"))
    b = startup_reply(1, 1, pg(b"S", b"application_name\x00other\x00"))
    [(strict, _)] = replies_of(PgFraming(frozenset()), STARTUP, a)
    assert not strict.equivalent(a, b)
    assert "message 3" in strict.difference(a, b)
    [(loose, _)] = replies_of(PgFraming(frozenset({b"application_name"})), STARTUP, a)
    assert loose.equivalent(a, b)


def test_postgres_a_refused_login_differs_and_ends_with_the_servers_last_words() -> None:
    fatal = pg(b"R", (0).to_bytes(4, "big")) + pg_error(b"FATAL", b"no pg_hba.conf entry")
    framing = PgFraming(frozenset())
    framing.request(STARTUP)
    expect = framing.begin(fatal, 0)
    assert expect is not None
    assert framing.feed(fatal, 0) == len(fatal)
    assert framing.ends() == 9  # the ErrorResponse begins after the 9-byte R
    assert not expect.equivalent(startup_reply(1, 1), fatal)
    # An ERROR (not FATAL) does not end the reply.
    framing = PgFraming(frozenset())
    framing.request(STARTUP + pg(b"Q", b"x\x00"))
    reply = pg_error(b"ERROR", b"syntax") + READY
    framing.begin(startup_reply(1, 1), 0)
    framing.feed(startup_reply(1, 1), 0)
    framing.begin(reply, 0)
    assert framing.feed(reply, 0) == len(reply) and framing.ends() == -1


@settings(max_examples=300)
@given(before=st.lists(pg_message, max_size=5), cuts=cuts)
def test_postgres_last_words_are_found_however_the_reply_is_cut(
    before: list[bytes], cuts: list[int]
) -> None:
    """A FATAL ends the reply wherever it comes, and ``ends`` says where it began."""
    reply = b"".join(before) + pg_error(b"FATAL", b"terminating connection")
    framing = PgFraming(frozenset())
    framing.request(STARTUP + pg(b"Q", b"select 1\x00"))
    startup = startup_reply(1, 2)
    framing.begin(startup, 0)
    assert framing.feed(startup, 0) == len(startup)
    offset, end = 0, MORE
    for piece in _pieces(reply, cuts):
        if offset == 0:
            assert framing.begin(piece, 0) is not None
        end = framing.feed(piece, 0)
        if end != MORE:
            break
        offset += len(piece)
    assert offset + end == len(reply)
    assert framing.ends() == len(reply) - len(pg_error(b"FATAL", b"terminating connection"))


def test_postgres_a_challenge_login_says_why_it_cannot_be_mirrored() -> None:
    md5 = pg(b"R", (5).to_bytes(4, "big") + b"salt")
    other = pg(b"R", (5).to_bytes(4, "big") + b"SALT")
    [(expect, _)] = replies_of(PgFraming(frozenset()), STARTUP, md5 + READY)
    assert "MD5 challenge" in expect.difference(md5 + READY, other + READY)


@pytest.mark.parametrize(
    ("head", "verdict"),
    [
        (b"\x00\x00\x00\x08\x04\xd2\x16", postgres.NEED_MORE),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", postgres.SSL),  # SSLRequest
        (b"\x00\x00\x00\x08\x04\xd2\x16\x30", postgres.ANSWER_NO),  # GSSENCRequest
        (b"\x00\x00\x00\x10\x04\xd2\x16\x2e" + bytes(4), postgres.NEED_MORE),
        (b"\x00\x00\x00\x10\x04\xd2\x16\x2e" + bytes(8), postgres.CANCEL),
        (STARTUP, postgres.PASS),
    ],
)
def test_postgres_preamble(head: bytes, verdict: int) -> None:
    assert postgres.preamble(head) == verdict


def test_postgres_cancel_request_is_what_postgres_reads() -> None:
    request = postgres.cancel_request(b"12345678")
    assert postgres.preamble(request) == postgres.CANCEL and request[8:] == b"12345678"


def test_postgres_notification_between_replies_stops_the_pairing() -> None:
    framing = PgFraming(frozenset())
    framing.request(STARTUP)
    framing.begin(startup_reply(1, 1), 0)
    framing.feed(startup_reply(1, 1), 0)
    assert framing.begin(pg(b"A", bytes(9)), 0) is None and framing.lost


# ------------------------------------------------------------------ memcached

mc_exchange = st.one_of(
    st.binary(max_size=10).map(lambda v: (b"set k 0 0 %d\r\n%s\r\n" % (len(v), v), b"STORED\r\n")),
    st.lists(st.binary(max_size=8), max_size=3).map(
        lambda vs: (
            b"get " + b" ".join(b"k%d" % i for i in range(len(vs))) + b"\r\n",
            b"".join(b"VALUE k%d 0 %d\r\n%s\r\n" % (i, len(v), v) for i, v in enumerate(vs))
            + b"END\r\n",
        )
    ),
    st.just((b"stats\r\n", b"STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n")),
    st.just((b"incr n 1\r\n", b"2\r\n")),
    st.just((b"bogus\r\n", b"ERROR\r\n")),
    st.binary(max_size=6).map(lambda v: (b"mg k v\r\n", b"VA %d\r\n%s\r\n" % (len(v), v))),
    st.just((b"mg k v\r\n", b"EN\r\n")),
    st.just((b"delete k noreply\r\n", b"")),
    st.just((b"get k noreply\r\n", b"END\r\n")),
    st.binary(max_size=6).map(
        lambda v: (b"gets k\r\n", b"VALUE k 7 %d 12345\r\n%s\r\nEND\r\n" % (len(v), v))
    ),
)


@settings(max_examples=300)
@given(exchanges=st.lists(mc_exchange, min_size=1, max_size=6), cuts=cuts)
def test_memcached_every_split_frames_the_same(
    exchanges: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    requests = b"".join(q for q, _ in exchanges)
    replies = b"".join(r for _, r in exchanges)
    answered = [r for _, r in exchanges if r]
    framing = McFraming()
    for piece in _pieces(requests, cuts):
        framing.request(piece)
    assert len(framing.pending) == len(answered) and not framing.deaf
    whole = frame(McFraming(), requests, replies, [])
    assert len(whole) == len(answered)
    assert frame(McFraming(), requests, replies, cuts) == whole
    # (and with runs of whole replies framed in one call, as the session does)
    assert frame(McFraming(), requests, replies, cuts, runs=True) == whole


def test_memcached_noreply_silences_only_the_commands_that_read_it() -> None:
    framing = McFraming()
    framing.request(b"set k 0 0 1 noreply\r\nx\r\ndelete k noreply\r\nincr n 1 noreply\r\n")
    assert framing.pending == []
    # (memcached reads no noreply in a retrieval or stats: a key, an argument)
    framing.request(b"get k noreply\r\nstats noreply\r\n")
    assert [e.label for e in framing.pending] == ["GET", "STATS"]


def test_memcached_cas_uniques_and_stats_may_differ_values_not() -> None:
    replies = replies_of(
        McFraming(),
        b"gets a\r\nstats\r\nget a\r\nmg a v c t\r\n",
        b"VALUE a 0 1 17\r\nx\r\nEND\r\nSTAT pid 1\r\nEND\r\nVALUE a 0 1\r\nx\r\nEND\r\n"
        b"VA 1 c17 t-1\r\nx\r\n",
    )
    (gets, a), (stats, b), (get, c), (mg, d) = replies
    assert gets.equivalent(a, b"VALUE a 0 1 99\r\nx\r\nEND\r\n")
    assert not gets.equivalent(a, b"VALUE a 0 1 17\r\ny\r\nEND\r\n")
    assert stats.equivalent(b, b"STAT pid 2\r\nSTAT uptime 3\r\nEND\r\n")
    assert not get.equivalent(c, b"END\r\n")
    assert mg.equivalent(d, b"VA 1 c18 t-1\r\nx\r\n")
    assert not mg.equivalent(d, b"VA 1 c17 t-1\r\ny\r\n")


def test_memcached_what_is_not_modelled_stops_the_pairing() -> None:
    for request in (b"\x80\x00\x00\x00", b"watch\r\n", b"mg k v q\r\n", b"set k 0 0 x\r\n"):
        framing = McFraming()
        framing.request(request)
        assert framing.deaf, request


def test_postgres_liveness_is_an_answer_that_is_not_cannot_connect_now() -> None:
    request = postgres.liveness_request()
    assert postgres.preamble(request) == postgres.PASS
    framing = PgFraming(frozenset())
    framing.request(request)
    assert [e.label for e in framing.pending] == ["startup"] and not framing.deaf
    no_role = pg(b"E", b"SFATAL\x00C28000\x00Mrole does not exist\x00\x00")
    shutting = pg(b"E", b"SFATAL\x00C57P03\x00Mthe database system is shutting down\x00\x00")
    assert postgres.liveness_verdict(pg(b"R", bytes(4))) is True
    assert postgres.liveness_verdict(no_role) is True
    assert postgres.liveness_verdict(shutting[:7]) is False
    verdict = postgres.liveness_verdict(shutting)
    assert isinstance(verdict, str) and "shutting down" in verdict


def test_postgres_copy_from_stdin_splits_its_reply_where_the_client_sends_data() -> None:
    copy_in = pg(b"G", b"\x00\x00\x01\x00\x00")
    done = pg(b"C", b"COPY 2\x00")
    # Simple protocol: Q's reply ends at CopyInResponse; CopyDone's at ReadyForQuery.
    simple = PgFraming(frozenset())
    requests = STARTUP + pg(b"Q", b"copy t from stdin\x00")
    requests += pg(b"d", b"1\n") + pg(b"d", b"2\n") + pg(b"c", b"")
    replies = replies_of(simple, requests, startup_reply(1, 1) + copy_in + done + READY)
    assert [(e.name(), r) for e, r in replies[1:]] == [
        ("Query 'copy t from stdin'", copy_in),
        ("CopyDone", done + READY),
    ]
    # Extended protocol: the Sync sent with the Execute is ignored during the COPY; the
    # CommandComplete answers CopyDone, the ReadyForQuery the Sync after it.
    extended = PgFraming(frozenset())
    requests = STARTUP + pg(b"P", b"\x00copy t from stdin\x00\x00\x00") + pg(b"S", b"")
    requests += pg(b"d", b"1\n") + pg(b"c", b"") + pg(b"S", b"")
    parsed = pg(b"1", b"") + pg(b"2", b"")
    replies = replies_of(extended, requests, startup_reply(1, 1) + parsed + copy_in + done + READY)
    assert [r for _, r in replies[1:]] == [parsed + copy_in, done, READY]


# The fast path (core/http.py fast_head) must read every message it takes as h11
# does: same expectations, same ends, same comparisons; odd messages go to h11.

_ODD_VALUE = st.lists(st.sampled_from([b"a", b"1", b" ", b"\t", b"\x01", b"\x80", b"\xff", b"-"]))
_HEADER_LINE = st.one_of(
    st.just(b"Host: h"),
    st.sampled_from([b"0", b"3", b"03", b"3 ", b" 3", b"+3", b"x", b"99999999999999999999"]).map(
        lambda v: b"Content-Length:" + v
    ),
    st.just(b"Transfer-Encoding: chunked"),
    st.just(b"Upgrade: websocket"),
    st.just(b"Expect: 100-continue"),
    st.just(b"Connection: close"),
    _ODD_VALUE.map(lambda v: b"X-A:" + b"".join(v)),
    st.sampled_from([b"Bad Name: v", b" folded", b"NoColon", b"X-B : v", b"Date: now"]),
)
_BODY = st.sampled_from([b"", b"abc", b"0\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"abcdef"])


@st.composite
def _odd_request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT", b"G T", b""]))
    version = draw(st.sampled_from([b"1.1", b"1.0", b"2.0"]))
    headers = draw(st.lists(_HEADER_LINE, max_size=4))
    head = b"%s /x HTTP/%s\r\n" % (method, version) + b"".join(h + b"\r\n" for h in headers)
    return head + b"\r\n" + draw(_BODY)


@st.composite
def _odd_response(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([b"100", b"101", b"200", b"204", b"304", b"404", b"2000"]))
    reason = draw(st.sampled_from([b" OK", b"", b" ", b" Not \x80 Found", b" a\tb"]))
    headers = draw(st.lists(_HEADER_LINE, max_size=4))
    head = b"HTTP/1.1 %s%s\r\n" % (status, reason) + b"".join(h + b"\r\n" for h in headers)
    return head + b"\r\n" + draw(_BODY)


def _trace(framing: HttpFraming, requests: bytes, replies: bytes, cuts: list[int]) -> list[Any]:
    """What framing ``replies`` says at each step: labels, ends, MORE, GARBAGE."""
    framing.request(requests)
    out: list[Any] = [[e.name() for e in framing.pending]]
    offset, inside = 0, False
    for piece in _pieces(replies, cuts):
        pos = 0
        while pos < len(piece):
            if not inside:
                expect = framing.begin(piece, pos)
                if expect is None:
                    return [*out, "nothing expected"]
                inside = True
            end = framing.feed(piece, pos)
            if end == GARBAGE:
                return [*out, "garbage"]
            if end == MORE:
                break
            out.append(offset + end)
            inside = False
            pos = end
        offset += len(piece)
    return [*out, "open" if inside else "done", framing.finish() if inside else None]


@settings(max_examples=600)
@example(  # (what is left after a response is no status line: h11 says garbage at once)
    requests=[b"GET /x HTTP/1.0\r\n\r\n"] * 2,
    responses=[b"HTTP/1.1 200 OK\r\nContent-Length:3\r\n\r\n0\r\n\r\n"],
    cuts=[],
)
@given(
    requests=st.lists(_odd_request(), min_size=1, max_size=3),
    responses=st.lists(_odd_response(), min_size=1, max_size=3),
    cuts=cuts,
)
def test_http_fast_path_frames_as_h11_does(
    requests: list[bytes], responses: list[bytes], cuts: list[int]
) -> None:
    reqs, reps = b"".join(requests), b"".join(responses)
    slow = _trace(HttpFraming(HEADERS, fast=False), reqs, reps, cuts)
    assert _trace(HttpFraming(HEADERS), reqs, reps, cuts) == slow
    assert _trace(HttpFraming(HEADERS), reqs, reps, []) == _trace(
        HttpFraming(HEADERS, fast=False), reqs, reps, []
    )


@settings(max_examples=400)
@given(a=_odd_response(), b=_odd_response(), method=st.sampled_from([b"GET", b"HEAD"]))
def test_http_fast_path_compares_as_h11_does(a: bytes, b: bytes, method: bytes) -> None:
    fast = HttpFraming(HEADERS)
    fast.request(b"%s /x HTTP/1.1\r\nHost: h\r\n\r\n" % method)
    slow = HttpFraming(HEADERS, fast=False)
    slow.request(b"%s /x HTTP/1.1\r\nHost: h\r\n\r\n" % method)
    [f], [s] = fast.pending, slow.pending
    assert f.equivalent(a, b) == s.equivalent(a, b)
    assert isinstance(f, HttpExpect) and isinstance(s, HttpExpect)
    read = f.fast_read(a)
    if read is not None:
        assert read == s.read(a)
