"""Tier 1 tests of the demo protocol: Java number formatting, message bytes, the parser."""

from __future__ import annotations

import itertools
import math
import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicaproxy.demo.protocol import (
    EXPECTED_LINES,
    FIRST_MESSAGE,
    REPLY,
    SECOND_MESSAGE,
    TOTAL_CLIENT_BYTES,
    ProtocolError,
    ServerParser,
    decode_text,
    java_double_str,
)

CLIENT_STREAM = FIRST_MESSAGE + SECOND_MESSAGE

# Double.toString outputs checked against a real JVM (Temurin 25; the shortest-digits
# algorithm Java uses since JDK 19).
JAVA_DOUBLE_TO_STRING = [
    (1234567890.1234567890, "1.2345678901234567E9"),
    (1.1, "1.1"),
    (1.5, "1.5"),
    (1e7, "1.0E7"),
    (-1e7, "-1.0E7"),
    (9999999.0, "9999999.0"),
    (9999999.999999998, "9999999.999999998"),
    (0.001, "0.001"),
    (0.0009999999999999998, "9.999999999999998E-4"),
    (0.0001, "1.0E-4"),
    (0.1, "0.1"),
    (1 / 3, "0.3333333333333333"),
    (100.0, "100.0"),
    (123.0, "123.0"),
    (-1.5e-10, "-1.5E-10"),
    (1e21, "1.0E21"),
    (1e22, "1.0E22"),
    (1e23, "1.0E23"),
    (123456789012.0, "1.23456789012E11"),
    (2.0**63, "9.223372036854776E18"),
    (1.7976931348623157e308, "1.7976931348623157E308"),
    (2.2250738585072014e-308, "2.2250738585072014E-308"),
    (5e-324, "4.9E-324"),  # Double.MIN_VALUE: Java picks the closer 2-digit decimal
    (1e-323, "9.9E-324"),
    (1.5e-323, "1.5E-323"),
    (0.0, "0.0"),
    (-0.0, "-0.0"),
    (math.nan, "NaN"),
    (math.inf, "Infinity"),
    (-math.inf, "-Infinity"),
]


@pytest.mark.parametrize(("value", "java"), JAVA_DOUBLE_TO_STRING)
def test_java_double_str_matches_java(value: float, java: str) -> None:
    assert java_double_str(value) == java


_JAVA_DOUBLE = re.compile(r"-?(\d+\.\d+|\d\.\d+E-?\d+)")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_java_double_str_round_trips_and_has_java_shape(value: float) -> None:
    text = java_double_str(value)
    assert _JAVA_DOUBLE.fullmatch(text), text
    assert float(text) == value
    assert math.copysign(1.0, float(text)) == math.copysign(1.0, value)
    scientific = "E" in text
    assert scientific == (value != 0 and not 1e-3 <= abs(value) < 1e7)


def test_first_message_layout() -> None:
    expected = (
        (123).to_bytes(4, "big", signed=True) + struct.pack(">d", 1234567890.1234567890) + b"hola"
    )
    assert expected == b"\x00\x00\x00\x7b" + bytes.fromhex("41d26580b487e6b7") + b"hola"
    assert expected == FIRST_MESSAGE
    assert len(FIRST_MESSAGE) == 16


def test_second_message_layout() -> None:
    expected = b"".join(struct.pack(">d", v) for v in (1.1, 1.2, 1.3, 1.4, 1.5))
    assert expected[:8] == bytes.fromhex("3ff199999999999a")
    assert expected == SECOND_MESSAGE
    assert len(SECOND_MESSAGE) == 40
    assert TOTAL_CLIENT_BYTES == 56


def test_reply() -> None:
    assert REPLY == b"HOLA"
    assert decode_text(REPLY) == "HOLA"


def test_decode_text_replaces_bad_bytes_like_java() -> None:
    assert decode_text(b"ho\xffa") == "ho\ufffda"


@given(st.sets(st.integers(min_value=1, max_value=TOTAL_CLIENT_BYTES - 1)))
def test_parser_any_chunking(cuts: set[int]) -> None:
    bounds = [0, *sorted(cuts), TOTAL_CLIENT_BYTES]
    parser = ServerParser()
    lines: list[str] = []
    reply_at: int | None = None
    for start, end in itertools.pairwise(bounds):
        lines += parser.feed(CLIENT_STREAM[start:end])
        if parser.reply_due:
            assert reply_at is None, "the reply is due only once"
            reply_at = end
            assert parser.take_reply() == REPLY
        assert parser.reply_due is False
        # The reply is due with the chunk that completes byte 16, not before or after.
        assert (reply_at is not None) == (end >= len(FIRST_MESSAGE))
    parser.eof()
    assert parser.done
    assert tuple(lines) == EXPECTED_LINES
    # ... i.e. with the first chunk boundary at or past byte 16.
    assert reply_at == min(b for b in bounds if b >= len(FIRST_MESSAGE))


def test_parser_byte_by_byte() -> None:
    parser = ServerParser()
    lines: list[str] = []
    for i, byte in enumerate(CLIENT_STREAM, start=1):
        lines += parser.feed(bytes([byte]))
        assert parser.reply_due == (i == len(FIRST_MESSAGE)), i
        if parser.reply_due:
            parser.take_reply()
        assert parser.consumed <= i
    assert tuple(lines) == EXPECTED_LINES
    assert parser.consumed == TOTAL_CLIENT_BYTES


def test_parser_lines_arrive_as_values_complete() -> None:
    parser = ServerParser()
    assert parser.feed(CLIENT_STREAM[:3]) == []
    assert parser.feed(CLIENT_STREAM[3:5]) == ["123"]
    assert parser.feed(CLIENT_STREAM[5:16]) == ["1.2345678901234567E9", "hola"]
    assert parser.reply_due
    assert parser.feed(CLIENT_STREAM[16:]) == ["1.1", "1.2", "1.3", "1.4", "1.5"]


def test_parser_prints_other_values_as_java_would() -> None:
    stream = struct.pack(">id4s5d", -7, 1e-5, b"ABCD", math.nan, -0.0, 1e7, 0.5, 2.0)
    parser = ServerParser()
    lines = parser.feed(stream)
    parser.eof()
    assert lines == ["-7", "1.0E-5", "ABCD", "NaN", "-0.0", "1.0E7", "0.5", "2.0"]


def test_take_reply_when_not_due_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        ServerParser().take_reply()


@pytest.mark.parametrize(
    ("received", "where"),
    [
        (0, "the int32 of the first message"),
        (3, "the int32 of the first message"),
        (4, "the float64 of the first message"),
        (13, "the 4-byte text of the first message"),
        (16, "float64 1 of 5 of the second message"),
        (55, "float64 5 of 5 of the second message"),
    ],
)
def test_short_input_raises(received: int, where: str) -> None:
    parser = ServerParser()
    parser.feed(CLIENT_STREAM[:received])
    with pytest.raises(ProtocolError) as info:
        parser.eof()
    assert str(info.value) == (f"connection closed after {received} of 56 bytes, in {where}")
    with pytest.raises(ProtocolError):  # the parser stays failed
        parser.feed(b"x")


@given(
    garbage=st.binary(min_size=1, max_size=64),
    split=st.integers(min_value=0, max_value=TOTAL_CLIENT_BYTES),
)
def test_trailing_garbage_raises_and_keeps_lines(garbage: bytes, split: int) -> None:
    parser = ServerParser()
    lines = parser.feed(CLIENT_STREAM[:split])
    with pytest.raises(ProtocolError, match="unexpected byte") as info:
        parser.feed(CLIENT_STREAM[split:] + garbage)
    # Values completed in the failing call are handed back with the error.
    assert tuple(lines) + info.value.lines == EXPECTED_LINES
    assert f"{len(garbage)} unexpected byte(s)" in str(info.value)
    assert parser.reply_due  # nobody took the reply yet: it is still owed
    with pytest.raises(ProtocolError):
        parser.eof()
