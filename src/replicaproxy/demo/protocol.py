"""The classroom demo protocol: message bytes, Java-style value printing, a sans-IO parser.

The protocol is wire-compatible with the classroom Java programs, which use
``DataOutputStream`` / ``DataInputStream`` (big-endian, no framing):

1. client -> server: int32 ``123``, float64 ``1234567890.1234567890``, the 4 bytes ``hola``;
2. server -> client: the 4 bytes ``HOLA``;
3. client -> server: five float64 ``1.1 1.2 1.3 1.4 1.5``; then both close.

The server prints every value on its own line exactly as Java's ``System.out.println``
does, so the output of our server, of the Java server and of every replica behind the
proxy can be compared line by line.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Final

__all__ = [
    "EXPECTED_LINES",
    "FIRST_DOUBLE",
    "FIRST_INT",
    "FIRST_MESSAGE",
    "FIRST_TEXT",
    "REPLY",
    "SECOND_DOUBLES",
    "SECOND_MESSAGE",
    "TOTAL_CLIENT_BYTES",
    "ProtocolError",
    "ServerParser",
    "decode_text",
    "java_double_str",
]

FIRST_INT: Final = 123
FIRST_DOUBLE: Final = 1234567890.1234567890
FIRST_TEXT: Final = b"hola"
REPLY: Final = b"HOLA"
SECOND_DOUBLES: Final = (1.1, 1.2, 1.3, 1.4, 1.5)

#: ``writeInt`` + ``writeDouble`` + ``write(byte[4])``: 16 bytes, big-endian, no padding.
FIRST_MESSAGE: Final = struct.pack(">id4s", FIRST_INT, FIRST_DOUBLE, FIRST_TEXT)
#: Five ``writeDouble``: 40 bytes.
SECOND_MESSAGE: Final = struct.pack(">5d", *SECOND_DOUBLES)
#: Everything a well-behaved client sends.
TOTAL_CLIENT_BYTES: Final = len(FIRST_MESSAGE) + len(SECOND_MESSAGE)

#: What the Java server prints for one well-behaved client (taken from real Java output,
#: deliberately spelled out rather than computed with :func:`java_double_str`).
EXPECTED_LINES: Final = (
    "123",
    "1.2345678901234567E9",
    "hola",
    "1.1",
    "1.2",
    "1.3",
    "1.4",
    "1.5",
)


class ProtocolError(Exception):
    """The peer broke the demo protocol (closed early, sent bytes past the end).

    ``lines`` holds the values that completed in the same :meth:`ServerParser.feed`
    call before the error was found, so a server can still print them.
    """

    def __init__(self, message: str, *, lines: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.lines = lines


def decode_text(data: bytes) -> str:
    """Decode bytes the way ``new String(bytes)`` does on a UTF-8 JVM (bad bytes -> U+FFFD)."""
    return data.decode("utf-8", errors="replace")


def _shortest_decimal(x: float) -> tuple[str, int]:
    """Return ``(digits, e)`` with ``x == d1.d2d3... * 10**e`` for a finite ``x > 0``.

    ``digits`` has no trailing zeros. The digits are Python's ``repr`` digits: the
    shortest decimal that rounds back to ``x``, the closest one if several qualify.
    That is the rule ``Double.toString`` follows since JDK 19 (JDK-4511638).
    """
    _sign, digit_tuple, exponent = Decimal(repr(x)).as_tuple()
    assert isinstance(exponent, int)  # finite by contract
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    e = len(digit_tuple) - 1 + exponent
    if len(digits) == 1:
        # Java's one refinement over plain shortest: when one digit is enough, a
        # two-digit decimal that rounds to x and lies closer to it wins
        # (Double.MIN_VALUE prints as 4.9E-324, where repr gives 5e-324). Only
        # subnormals have intervals wide enough for this to matter.
        digits, e = _closest_one_or_two_digits(x, digits, e)
    return digits, e


def _closest_one_or_two_digits(x: float, digit: str, e: int) -> tuple[str, int]:
    exact = Fraction(x)
    # (significand, power of ten); the one-digit candidate first so that it wins an
    # exact tie with a two-digit one unless the two-digit one ends in an even digit.
    candidates: list[tuple[int, int]] = [(int(digit), e)]
    for q in (e - 2, e - 1):
        scale = Fraction(10) ** q
        centre = round(exact / scale)
        for c in (centre - 1, centre, centre + 1):
            if 10 <= c <= 99 and float(c * scale) == x:
                candidates.append((c, q))

    def key(candidate: tuple[int, int]) -> tuple[Fraction, int]:
        c, q = candidate
        return abs(c * Fraction(10) ** q - exact), (c % 10) % 2

    c, q = min(candidates, key=key)
    text = str(c)
    stripped = text.rstrip("0")
    return stripped, q + len(text) - 1


def java_double_str(x: float) -> str:
    """Format ``x`` exactly as Java's ``Double.toString`` (and so ``println(double)``) does.

    Decimal notation when ``1e-3 <= |x| < 1e7`` (``100.0``, ``0.001``), otherwise
    computerized scientific notation with at least one fraction digit
    (``1.2345678901234567E9``, ``1.0E7``, ``1.0E-4``); ``NaN``, ``Infinity``,
    ``-Infinity``, ``0.0`` and ``-0.0`` spelled as Java spells them. The digits are
    the shortest that identify ``x`` (JDK 19+; older JDKs sometimes print more).
    """
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    sign = "-" if math.copysign(1.0, x) < 0 else ""
    if x == 0:
        return f"{sign}0.0"
    digits, e = _shortest_decimal(abs(x))
    if 1e-3 <= abs(x) < 1e7:
        if e < 0:
            return f"{sign}0.{'0' * (-e - 1)}{digits}"
        integer = digits[: e + 1].ljust(e + 1, "0")
        fraction = digits[e + 1 :] or "0"
        return f"{sign}{integer}.{fraction}"
    return f"{sign}{digits[0]}.{digits[1:] or '0'}E{e}"


def _java_int(data: bytes) -> str:
    return str(int.from_bytes(data, "big", signed=True))


def _java_double(data: bytes) -> str:
    value: float = struct.unpack(">d", data)[0]
    return java_double_str(value)


# (size, how Java prints it, what it is): the client's whole stream, in order.
_FIELDS: Final[tuple[tuple[int, Callable[[bytes], str], str], ...]] = (
    (4, _java_int, "the int32 of the first message"),
    (8, _java_double, "the float64 of the first message"),
    (4, decode_text, "the 4-byte text of the first message"),
    *((8, _java_double, f"float64 {i} of 5 of the second message") for i in range(1, 6)),
)
# Index of the field after which the server owes the client its reply.
_REPLY_AFTER_FIELD: Final = 2


class ServerParser:
    """Incremental, sans-IO parser for what a demo server receives.

    Feed it bytes as they arrive; it returns the lines to print as values complete.
    When :attr:`reply_due` turns true (the 16-byte first message is complete) the
    server sends :meth:`take_reply`. Call :meth:`eof` when the client closes; it
    raises :class:`ProtocolError` if the stream was short. Bytes past the 56th raise
    :class:`ProtocolError` from :meth:`feed`.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._field = 0
        self._consumed = 0
        self._reply_due = False
        self._error: ProtocolError | None = None

    @property
    def consumed(self) -> int:
        """Bytes of the client stream parsed into complete values so far."""
        return self._consumed

    @property
    def reply_due(self) -> bool:
        """True from the end of the first message until :meth:`take_reply` is called."""
        return self._reply_due

    @property
    def done(self) -> bool:
        """True once all eight values have been received."""
        return self._field == len(_FIELDS)

    def take_reply(self) -> bytes:
        """Return the reply bytes to send and mark the reply as sent."""
        if not self._reply_due:
            raise RuntimeError("no reply is due")  # a bug in the caller, not the peer
        self._reply_due = False
        return REPLY

    def feed(self, data: bytes) -> list[str]:
        """Add received bytes; return the printed line of every value they complete."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        lines: list[str] = []
        while not self.done:
            size, render, _ = _FIELDS[self._field]
            if len(self._buffer) < size:
                break
            lines.append(render(bytes(self._buffer[:size])))
            del self._buffer[:size]
            self._consumed += size
            if self._field == _REPLY_AFTER_FIELD:
                self._reply_due = True
            self._field += 1
        if self.done and self._buffer:
            self._error = ProtocolError(
                f"{len(self._buffer)} unexpected byte(s) after the last value "
                f"(the client stream is {TOTAL_CLIENT_BYTES} bytes)",
                lines=tuple(lines),
            )
            raise self._error
        return lines

    def eof(self) -> None:
        """The client closed its side; raise :class:`ProtocolError` if values are missing."""
        if self._error is not None:
            raise self._error
        if self.done:
            return
        received = self._consumed + len(self._buffer)
        _, _, what = _FIELDS[self._field]
        self._error = ProtocolError(
            f"connection closed after {received} of {TOTAL_CLIENT_BYTES} bytes, in {what}"
        )
        raise self._error
