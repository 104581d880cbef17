"""Tier 1: the RESP framer and its rules, by property (hypothesis) and by example."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_framers import _pieces, frame

from replicaproxy.core.framing import GARBAGE, LOST, MORE, Expect, guess_protocol
from replicaproxy.core.resp import (
    RespFraming,
    RespParser,
    RespRules,
    Scan,
    Transaction,
    Unordered,
    _number_line,
    _small_line,
    elements,
    tips_from_command,
)

# ------------------------------------------------------------------ RESP values

text = st.binary(max_size=12)
line = st.binary(max_size=10).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def _bulk(kind: bytes) -> st.SearchStrategy[bytes]:
    return text.map(lambda b: kind + b"%d\r\n%s\r\n" % (len(b), b))


scalars = st.one_of(
    line.map(lambda b: b"+" + b + b"\r\n"),
    line.map(lambda b: b"-ERR " + b + b"\r\n"),
    st.integers(-(10**12), 10**12).map(lambda i: b":%d\r\n" % i),
    _bulk(b"$"),
    st.just(b"$-1\r\n"),
    st.just(b"*-1\r\n"),
    st.just(b"_\r\n"),
    st.sampled_from(
        [b"#t\r\n", b"#f\r\n", b",3.14\r\n", b",inf\r\n", b"(12345678901234567890\r\n"]
    ),
    _bulk(b"!"),
    text.map(lambda b: b"=%d\r\ntxt:%s\r\n" % (len(b) + 4, b)),
)


def _aggregates(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    items = st.lists(children, max_size=4)
    return st.one_of(
        st.tuples(st.sampled_from([b"*", b"~", b">"]), items).map(
            lambda t: t[0] + b"%d\r\n" % len(t[1]) + b"".join(t[1])
        ),
        st.lists(st.tuples(children, children), max_size=3).map(
            lambda pairs: b"%%%d\r\n" % len(pairs) + b"".join(k + v for k, v in pairs)
        ),
        st.tuples(st.lists(st.tuples(children, children), min_size=1, max_size=2), children).map(
            lambda t: b"|%d\r\n" % len(t[0]) + b"".join(k + v for k, v in t[0]) + t[1]
        ),
    )


values = st.recursive(scalars, _aggregates, max_leaves=12)


def _frame_all(stream: bytes, cuts: list[int]) -> list[int]:
    """Ends of the values in ``stream`` as a parser finds them, fed in pieces."""
    ends: list[int] = []
    parser = RespParser()
    offset = 0
    pieces = _pieces(stream, cuts)
    for piece in pieces:
        pos = 0
        while pos < len(piece):
            end = parser.feed(piece, pos)
            assert end != GARBAGE, (piece, pos)
            if end == MORE:
                break
            ends.append(offset + end)
            parser = RespParser()
            pos = end
        offset += len(piece)
    return ends


@settings(max_examples=400)
@given(
    replies=st.lists(values, min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 9), max_size=40),
)
def test_every_split_of_a_stream_of_replies_frames_the_same(
    replies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(replies)
    expected = []
    at = 0
    for reply in replies:
        at += len(reply)
        expected.append(at)
    assert _frame_all(stream, cuts) == expected
    assert _frame_all(stream, []) == expected


@given(value=values)
def test_a_value_cut_short_is_never_taken_for_whole(value: bytes) -> None:
    for n in range(len(value)):
        assert RespParser().feed(value[:n], 0) == MORE, value[:n]


@pytest.mark.parametrize(
    "garbage", [b"?oops\r\n", b"$abc\r\n", b"*-5\r\n", b"$-2\r\n", b"$" + b"9" * 30 + b"\r\n"]
)
def test_what_is_not_resp_is_garbage(garbage: bytes) -> None:
    assert RespParser().feed(garbage, 0) == GARBAGE


def test_a_header_line_longer_than_redis_allows_is_garbage() -> None:
    assert RespParser().feed(b"+" + b"x" * 70_000, 0) == GARBAGE


# ------------------------------------------------------------------ requests


def _command(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


RULES = RespRules()
ARG = st.binary(min_size=0, max_size=24)  # (lengths of one digit and of two)
NAMES = st.sampled_from(
    [b"GET", b"set", b"SMEMBERS", b"info", b"HGETALL", b"CLIENT", b"config", b"SCAN", b"hscan"]
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """One request, as multibulk or inline, and its first arguments."""
    args = [draw(NAMES), *draw(st.lists(ARG, max_size=4))]
    if draw(st.booleans()) and all(a and a.isalnum() for a in args):
        return b" ".join(args) + draw(st.sampled_from([b"\r\n", b"\n"])), args
    return _command(args), args


def _expectations(framing: RespFraming) -> list[Expect]:
    return list(framing.pending)


@settings(max_examples=300)
@given(reqs=st.lists(requests(), min_size=1, max_size=8), cuts=st.lists(st.integers(1, 7)))
def test_every_split_of_the_requests_queues_the_same_expectations(
    reqs: list[tuple[bytes, list[bytes]]], cuts: list[int]
) -> None:
    stream = b"".join(r for r, _ in reqs)
    whole = RespFraming(RULES)
    whole.request(stream)
    split = RespFraming(RULES)
    for piece in _pieces(stream, cuts):
        split.request(piece)
    assert _expectations(split) == _expectations(whole)
    assert [e.label for e in _expectations(whole)] == [RULES.lookup(args).label for _, args in reqs]


@settings(max_examples=500)
@given(
    head=st.binary(max_size=3),
    number=st.one_of(st.integers(0, 120).map(b"%d".__mod__), st.binary(max_size=4)),
    tail=st.sampled_from([b"\r\n", b"\r", b"\n", b"", b"\r\r\n", b"x\r\n"]),
    most=st.integers(0, 150),
)
def test_the_short_number_reader_reads_as_the_long_one(
    head: bytes, number: bytes, tail: bytes, most: int
) -> None:
    data = head + number + tail
    assert _small_line(data, len(head), most) == _number_line(data, len(head), most)


def test_large_arguments_are_skipped_not_kept() -> None:
    f = RespFraming(RULES)
    f.request(_command([b"SET", b"k", b"v" * 1_000_000])[:500_000])
    assert len(f._part) < 100, "only the arguments the rules read are kept"


@pytest.mark.parametrize(
    ("stream", "labels"),
    [
        # MULTI: queued commands answer +QUEUED; EXEC, each command's rule.
        (
            _command([b"MULTI"]) + _command([b"SMEMBERS", b"s"]) + _command([b"GET", b"k"])
            + _command([b"EXEC"]),
            ["MULTI", "(queued)", "(queued)", "EXEC"],
        ),
        # CLIENT REPLY SKIP silences itself and the next command.
        (
            b"CLIENT REPLY SKIP\r\nPING\r\nPING\r\n",
            ["PING"],
        ),
        # OFF silences everything until ON, which answers.
        (
            b"CLIENT REPLY OFF\r\nGET a\r\nSET a b\r\nCLIENT REPLY ON\r\nGET a\r\n",
            ["CLIENT REPLY", "GET"],
        ),
        # RESET answers even when replies are off, and ends MULTI.
        (
            b"CLIENT REPLY OFF\r\nRESET\r\nMULTI\r\nRESET\r\nPING\r\n",
            ["RESET", "MULTI", "RESET", "PING"],
        ),
        # Empty requests get no reply.
        (b"\r\n*0\r\n*-1\r\nPING\r\n", ["PING"]),
    ],
)  # fmt: skip
def test_states_that_change_which_request_gets_a_reply(stream: bytes, labels: list[str]) -> None:
    f = RespFraming(RULES)
    for i in range(len(stream)):  # byte by byte: the states survive any split
        f.request(stream[i : i + 1])
    assert [e.label for e in f.pending] == labels


def test_exec_compares_each_queued_reply_by_its_own_rule() -> None:
    f = RespFraming(RULES)
    f.request(b"MULTI\r\nSMEMBERS s\r\nGET k\r\nEXEC\r\n")
    exec_ = list(f.pending)[-1]
    assert isinstance(exec_, Transaction)
    ours = b"*2\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nv\r\n"
    theirs = b"*2\r\n*2\r\n$1\r\nb\r\n$1\r\na\r\n$1\r\nv\r\n"
    other = b"*2\r\n*2\r\n$1\r\nb\r\n$1\r\na\r\n$1\r\nw\r\n"
    assert exec_.equivalent(ours, theirs)
    assert not exec_.equivalent(ours, other)
    assert "queued command 2 (GET)" in exec_.difference(ours, other, "r1")


@pytest.mark.parametrize(
    "stream",
    [
        b"SUBSCRIBE ch\r\nPING\r\n",
        b"MONITOR\r\n",
        b"PSYNC ? -1\r\n",
        b"MULTI\r\nCLIENT REPLY OFF\r\n",
    ],
)
def test_states_not_modelled_end_the_pairing_where_they_begin(stream: bytes) -> None:
    f = RespFraming(RULES)
    f.request(b"GET a\r\n" + stream)
    assert f.deaf
    assert f.expect_next() is not None  # the reply to GET still pairs
    while f.pending and f.pending[0] is not LOST:
        f.expect_next()
    assert f.expect_next() is None and f.lost


def test_a_push_answers_no_request() -> None:
    f = RespFraming(RULES)
    f.request(b"GET a\r\n")
    assert f.begin(b">2\r\n+invalidate\r\n*0\r\n", 0) is None
    assert f.lost


def test_an_inline_request_longer_than_redis_takes_ends_the_pairing() -> None:
    f = RespFraming(RULES)
    f.request(b"X" * 70_000)
    assert f.deaf


def test_pipelining_pairs_replies_with_requests_in_order() -> None:
    f = RespFraming(RULES)
    f.request(b"INFO\r\nGET k\r\nSMEMBERS s\r\n")
    replies = b"$3\r\nabc\r\n$-1\r\n*1\r\n$1\r\nx\r\n"
    got = []
    pos = 0
    while pos < len(replies):
        expect = f.begin(replies, pos)
        assert expect is not None
        end = f.feed(replies, pos)
        got.append((expect.label, replies[pos:end]))
        pos = end
    assert got == [
        ("INFO", b"$3\r\nabc\r\n"),
        ("GET", b"$-1\r\n"),
        ("SMEMBERS", b"*1\r\n$1\r\nx\r\n"),
    ]


# ------------------------------------------------------------------ the rules


@given(members=st.lists(st.binary(max_size=6), max_size=8), seed=st.integers())
def test_a_set_in_any_order_is_the_same_set(members: list[bytes], seed: int) -> None:
    shuffled = list(members)
    random.Random(seed).shuffle(shuffled)
    enc = [b"$%d\r\n%s\r\n" % (len(m), m) for m in members]
    mine = b"*%d\r\n" % len(members) + b"".join(enc)
    theirs = b"*%d\r\n" % len(members) + b"".join(enc[members.index(m)] for m in shuffled)
    rule = Unordered("SMEMBERS")
    assert rule.equivalent(mine, theirs)
    if members:
        changed = theirs[:-3] + (b"X" if theirs[-3:-2] != b"X" else b"Y") + b"\r\n"
        assert not rule.equivalent(mine, changed)


def test_hgetall_compares_pairs_not_elements() -> None:
    rule = RULES.lookup([b"HGETALL", b"h"])
    mine = b"*4\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n"
    reordered = b"*4\r\n$1\r\nb\r\n$1\r\n2\r\n$1\r\na\r\n$1\r\n1\r\n"
    swapped = b"*4\r\n$1\r\na\r\n$1\r\n2\r\n$1\r\nb\r\n$1\r\n1\r\n"  # same elements
    assert rule.equivalent(mine, reordered)
    assert not rule.equivalent(mine, swapped)
    resp3 = b"%2\r\n$1\r\nb\r\n$1\r\n2\r\n$1\r\na\r\n$1\r\n1\r\n"
    assert rule.equivalent(b"%2\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n", resp3)


def test_an_error_in_place_of_a_set_is_a_difference() -> None:
    rule = Unordered("SMEMBERS")
    assert not rule.equivalent(b"*1\r\n$1\r\na\r\n", b"-WRONGTYPE no\r\n")


def test_scan_compares_elements_only_of_a_whole_collection_in_one_batch() -> None:
    first = RULES.lookup([b"SCAN", b"0"])
    later = RULES.lookup([b"SCAN", b"17"])
    assert isinstance(first, Scan) and isinstance(later, Scan)
    whole = b"*2\r\n$1\r\n0\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n"
    assert first.equivalent(whole, b"*2\r\n$1\r\n0\r\n*2\r\n$1\r\nb\r\n$1\r\na\r\n")
    assert not first.equivalent(whole, b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\nb\r\n")
    # Another cursor, other elements: batches of two hash orders are not comparable.
    assert first.equivalent(whole, b"*2\r\n$2\r\n12\r\n*1\r\n$1\r\nb\r\n")
    assert later.equivalent(whole, b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\nz\r\n")
    assert not later.equivalent(whole, b"-ERR invalid cursor\r\n")


def test_the_defaults_match_what_redis_clients_and_servers_do() -> None:
    kinds = {
        "INFO": [b"INFO"],
        "HELLO": [b"HELLO", b"3"],
        "CLIENT ID": [b"CLIENT", b"ID"],
        "COMMAND DOCS": [b"COMMAND", b"DOCS"],
        "COMMAND": [b"COMMAND"],
        "CONFIG GET": [b"CONFIG", b"GET", b"port"],
        "SMEMBERS": [b"smembers", b"s"],
        "GET": [b"get", b"k"],
        "CONFIG SET": [b"CONFIG", b"SET", b"x", b"y"],
    }
    got = {name: RULES.lookup(args).kind for name, args in kinds.items()}
    assert got == {
        "INFO": "ignore",
        "HELLO": "ignore",
        "CLIENT ID": "ignore",
        "COMMAND DOCS": "ignore",
        "COMMAND": "ignore",
        "CONFIG GET": "ignore",
        "SMEMBERS": "unordered",
        "GET": "exact",
        "CONFIG SET": "exact",
    }
    assert RULES.lookup([b"CLIENT", b"ID"]).label == "CLIENT ID"


def test_config_extends_and_overrides_the_rules() -> None:
    rules = RespRules(ignore=["MYMOD.STATS"], exact=["INFO"], unordered=["LRANGE"])
    assert rules.lookup([b"mymod.stats"]).kind == "ignore"
    assert rules.lookup([b"INFO"]).kind == "exact"
    assert rules.lookup([b"lrange", b"l", b"0", b"-1"]).kind == "unordered"
    assert isinstance(RespRules(exact=["SCAN"]).lookup([b"SCAN", b"0"]), Expect)
    assert RespRules(exact=["SCAN"]).lookup([b"SCAN", b"0"]).kind == "exact"


def _entry(name: bytes, flags: list[bytes], tips: list[bytes], subs: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    def arr(items: list[bytes]) -> bytes:
        return b"*%d\r\n" % len(items) + b"".join(items)

    def s(x: bytes) -> bytes:
        return b"+" + x + b"\r\n"

    return arr(
        [
            b"$%d\r\n%s\r\n" % (len(name), name),
            b":-1\r\n",
            arr([s(f) for f in flags]),
            b":1\r\n",
            b":1\r\n",
            b":1\r\n",
            arr([]),
            arr([b"$%d\r\n%s\r\n" % (len(t), t) for t in tips]),
            arr([]),
            arr(list(subs)),
        ]
    )


def test_tips_from_command_follow_the_write_flag() -> None:
    reply = b"*4\r\n" + b"".join(
        [
            _entry(b"spop", [b"write"], [b"nondeterministic_output"]),
            _entry(b"srandmember", [b"readonly"], [b"nondeterministic_output"]),
            _entry(b"sinter", [b"readonly"], [b"nondeterministic_output_order"]),
            _entry(
                b"object",
                [],
                [],
                [_entry(b"object|freq", [b"readonly"], [b"nondeterministic_output"])],
            ),
        ]
    )
    assert tips_from_command(reply) == {
        "spop": "exact",
        "srandmember": "ignore",
        "sinter": "unordered",
        "object|freq": "ignore",
    }
    rules = RespRules(tips_from_command(reply))
    assert rules.lookup([b"SPOP", b"s"]).kind == "exact", "a random write is a real divergence"
    with pytest.raises(ValueError):
        tips_from_command(b"-ERR unknown command\r\n")


def test_elements_reads_the_top_level_of_an_aggregate() -> None:
    assert elements(b"*2\r\n$1\r\na\r\n:5\r\n") == (b"*", [b"$1\r\na\r\n", b":5\r\n"])
    assert elements(b"|1\r\n+k\r\n+v\r\n~1\r\n+x\r\n") == (b"|1\r\n+k\r\n+v\r\n~", [b"+x\r\n"])
    assert elements(b"+OK\r\n") is None


def test_a_multibulk_client_is_recognised_as_resp() -> None:
    assert guess_protocol(_command([b"GET", b"k"])) == "resp"
    assert guess_protocol(b"GET / HTTP/1.1\r\n") != "resp"
    assert guess_protocol(b"\x00\x00\x00{") is None


def test_a_default_for_every_subcommand_beats_the_tips_for_one() -> None:
    """COMMAND DOCS is unordered by Redis's tips, but its maps nest maps in each
    server's order: the built-in "COMMAND *" (ignore) wins."""
    tips = {"command|docs": "unordered", "client|list": "ignore", "spop": "exact"}
    rules = RespRules(tips)
    assert rules.lookup([b"COMMAND", b"DOCS"]).kind == "ignore"
    assert rules.lookup([b"SPOP", b"s"]).kind == "exact"
    # And the config's "NAME *" beats the built-in and the tips alike.
    assert RespRules(tips, exact=["CLIENT *"]).lookup([b"CLIENT", b"LIST"]).kind == "exact"
    assert RespRules(tips, exact=["COMMAND *"]).lookup([b"COMMAND", b"DOCS"]).kind == "exact"


@settings(max_examples=300)
@given(
    replies=st.lists(values.filter(lambda v: v[:1] != b">"), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 9), max_size=40),
)
def test_the_framing_finds_the_same_replies_as_the_parser(
    replies: list[bytes], cuts: list[int]
) -> None:
    """The primary's replies, read by the framing (with its shortcut for one-line and
    bulk replies), end where the general parser says, however they are cut."""
    stream = b"".join(replies)
    pings = b"PING\r\n" * len(replies)
    parsed = _frame_all(stream, [])
    assert frame(RespFraming(RULES), pings, stream, cuts) == parsed
    # (and with runs of whole replies framed in one call, as the session does)
    assert frame(RespFraming(RULES), pings, stream, cuts, runs=True) == parsed
