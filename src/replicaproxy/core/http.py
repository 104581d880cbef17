"""HTTP/1.1: requests and responses as messages, framed by h11, compared by header.

Each request the client sends is read with an h11 server-side connection of its
own (so pipelined requests are read as they come); each response with an h11
client-side connection to which its request was replayed, so that h11 knows
what the response answers (HEAD, 1xx, close-delimited bodies). Responses are
compared by status, headers and decoded body (chunked or not); headers named in
``[protocol.http] ignore_headers`` (``date`` by default) may differ. ``Upgrade``
and ``CONNECT`` switch protocols: bytes are compared from there on.

h11 is the parser of record, but a connection per message is most of the cost of
a small request. So the messages almost every server exchanges (a request whose
whole head and ``Content-Length`` body are at hand, a response with
``Content-Length`` or no body by rule) are read by :func:`fast_head` first, which
accepts only what h11 reads the same way (a property test holds it to that) and
leaves everything else (chunked, 1xx, close-delimited, odd syntax) to h11.
Most clients send the same few heads over and over, and a server's responses
differ from one another by their Date at most once a second: what the fast path
read of a head is remembered by the head's bytes (:data:`_REQUESTS`,
:data:`_RESPONSES`), so a head seen before costs a dictionary lookup.
"""

from __future__ import annotations

import re
from typing import Any, Final

import h11

from replicaproxy.core.framing import GARBAGE, MORE, Expect, Framing, ReplyParser, excerpt

#: Headers whose values are each server's own by default.
DEFAULT_IGNORE: Final = ("date",)
#: Headers that say how the body is framed, not what it is: the body is compared
#: decoded, so one server's chunks and another's Content-Length are the same answer.
_FRAMING_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding"})
#: How much of a target a log line shows.
TARGET_SHOWN: Final = 60

#: A response as compared: each head (1xx ones, then the final one) as (status,
#: reason, version, headers kept), and the decoded body.
_Head = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]
_Message = tuple[list[_Head], bytes]

#: The longest head the fast path reads; longer ones are h11's (its limit is 16 KiB).
FAST_HEAD_LIMIT: Final = 8192
# What the fast path accepts, a subset of RFC 9112 as h11 reads it: a token, then a
# colon, then visible characters, spaces and tabs (whitespace around a value is not
# part of it). Anything else (obs-fold, controls, a space before the colon) is h11's.
_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_TOKEN_CHARS: Final = b"-!#$%&'*+.^_`|~0123456789" + bytes(range(65, 91)) + bytes(range(97, 123))
#: What h11 reads its own way (or refuses) anywhere in a head: the fast path leaves it.
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REQUEST_LINE: Final = re.compile(b"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/(1\.[01])")
_STATUS_LINE: Final = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")


class FastHead:
    """A head the fast path read: its first line's parts, headers (names lowercase,
    values trimmed), where it ends, and the body's length by Content-Length (-1: none)."""

    __slots__ = ("end", "first", "headers", "length")

    def __init__(
        self, first: tuple[bytes, ...], headers: list[tuple[bytes, bytes]], end: int, length: int
    ) -> None:
        self.first = first
        self.headers = headers
        self.end = end
        self.length = length


def fast_head(data: bytes, pos: int, request: bool, keep: bool = True) -> FastHead | None:
    """The head at ``data[pos:]`` if the fast path reads it; None where h11 must (the
    head is incomplete, too long, has Transfer-Encoding, two Content-Lengths or
    anything the fast path does not accept). ``keep``: list the headers (else only
    Content-Length is read, for where a response ends)."""
    stop = data.find(b"\r\n\r\n", pos, pos + FAST_HEAD_LIMIT)
    if stop < 0:
        return None
    block = data[pos:stop]
    if _CONTROL.search(block.replace(b"\r\n", b"  ")) is not None:
        return None  # (a control character, a lone CR or LF: h11 says what they mean)
    lines = block.split(b"\r\n")
    m = (_REQUEST_LINE if request else _STATUS_LINE).fullmatch(lines[0])
    if m is None:
        return None
    first = tuple(g or b"" for g in m.groups())
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    hosts = 0
    for i in range(1, len(lines)):
        line = lines[i]
        colon = line.find(b":")
        if colon <= 0:
            return None
        name = line[:colon]
        if name.translate(None, _TOKEN_CHARS):
            return None  # (not a token: a space before the colon, an obs-fold line)
        name = name.lower()
        value = line[colon + 1 :].strip(b" \t")
        if name == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 18:
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
        elif name == b"host":
            hosts += 1
        if keep:
            headers.append((name, value))
    if request and (hosts > 1 or (hosts == 0 and first[2] == b"1.1")):
        return None  # (h11 refuses two Hosts, and an HTTP/1.1 request without one)
    return FastHead(first, headers, stop + 4, length)


#: Heads remembered, per kind (requests, responses); past this many, forgotten.
HEADS_KEPT: Final = 256


class FastRequest:
    """A request read by the fast path, with the h11.Request attributes HttpExpect uses."""

    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(self, head: FastHead) -> None:
        self.method = head.first[0]
        self.target = head.first[1]
        self.http_version = head.first[2]
        self.headers = head.headers

    def h11(self) -> Any:
        return h11.Request(
            method=self.method,
            target=self.target,
            headers=self.headers,
            http_version=self.http_version,
        )


def _fast_end(head: FastHead, method: bytes) -> int:
    """Where a response ends, by the fast path's rules; -1 where h11 must say."""
    status = int(head.first[1])
    if status < 200 or status == 101:
        return -1  # interim responses and switching protocols: h11's
    if method == b"HEAD" or status in (204, 304):
        return head.end
    if head.length < 0:
        return -1  # (a close-delimited body)
    return head.end + head.length


class HttpExpect(Expect):
    """The response a request expects, and how two responses to it compare."""

    def __init__(
        self,
        request: Any,
        ignore: frozenset[bytes],
        switches: bool,
        fast: bool = True,
    ) -> None:
        method = request.method.decode(errors="replace")
        target = request.target.decode(errors="replace")
        if len(target) > TARGET_SHOWN:
            target = target[: TARGET_SHOWN - 3] + "..."
        super().__init__(f"{method} {target}", "http")
        #: The request, an h11.Request (read untyped: see :meth:`read`).
        self.request: Any = request
        self.ignore = ignore
        #: The request asks to switch protocols (Upgrade, CONNECT).
        self.switches = switches
        #: The fast path may read its responses (False: h11 only, for tests).
        self.fast = fast and not switches
        # Responses differ only where a rule allows (a Date, once a second): compared
        # in place until they do.
        self.in_place = True

    def client(self) -> h11.Connection:
        """An h11 client connection that has sent this request (its head)."""
        conn = h11.Connection(h11.CLIENT)
        request = self.request
        if isinstance(request, FastRequest):
            request = request.h11()
        if request.http_version != b"1.1":
            # h11 sends HTTP/1.1 only; an HTTP/1.0 response is read the same either way.
            headers = list(request.headers)
            if not any(name == b"host" for name, _ in headers):
                headers.append((b"host", b"-"))
            request = h11.Request(method=request.method, target=request.target, headers=headers)
        conn.send(request)
        if not any(
            name in (b"content-length", b"transfer-encoding") for name, _ in request.headers
        ):
            conn.send(h11.EndOfMessage())
        return conn

    def fast_read(self, response: bytes) -> _Message | None:
        """:meth:`read` by the fast path; None where h11 must read it."""
        head = fast_head(response, 0, False)
        if head is None or _fast_end(head, self.request.method) != len(response):
            return None
        version, status, reason = head.first
        kept = [
            (k, v) for k, v in head.headers if k not in self.ignore and k not in _FRAMING_HEADERS
        ]
        return [(int(status), reason, version, kept)], response[head.end :]

    def read(self, response: bytes) -> _Message | None:
        """A whole response as it is compared; None if h11 cannot read it."""
        conn = self.client()
        heads: list[_Head] = []
        body = bytearray()
        try:
            conn.receive_data(response)
            conn.receive_data(b"")  # (a close-delimited body ends here)
            while True:
                event = conn.next_event()
                if isinstance(event, h11.InformationalResponse | h11.Response):
                    # h11 may hand out bytearrays where it says bytes; compiled code
                    # checks what it says, so its events are read untyped.
                    head: Any = event
                    kept = [
                        (bytes(k), bytes(v))
                        for k, v in head.headers
                        if k not in self.ignore and k not in _FRAMING_HEADERS
                    ]
                    heads.append(
                        (head.status_code, bytes(head.reason), bytes(head.http_version), kept)
                    )
                elif isinstance(event, h11.Data):
                    chunk: Any = event
                    body += chunk.data
                else:  # EndOfMessage, ConnectionClosed, NEED_DATA, PAUSED: no more
                    break
        except h11.ProtocolError:
            return None
        return heads, bytes(body)

    def equivalent(self, primary: bytes, mirror: bytes) -> bool:
        if primary == mirror:
            return True
        p = self.fast_read(primary) if self.fast else None
        if p is not None:
            m = self.fast_read(mirror)
            if m is not None:
                return p == m
        p = self.read(primary)
        return p is not None and p == self.read(mirror)

    def difference(self, primary: bytes, mirror: bytes, name: str = "replica") -> str:
        p = self.read(primary)
        m = self.read(mirror)
        if p is None or m is None:
            return super().difference(primary, mirror, name)
        for ours, theirs in zip(p[0], m[0], strict=False):
            if ours[:3] != theirs[:3]:
                return (
                    f"differs in status: primary {ours[0]} {_show(ours[1])}, {name} "
                    f"{theirs[0]} {_show(theirs[1])}"
                )
            if ours[3] != theirs[3]:
                a, b = dict(ours[3]), dict(theirs[3])
                for key in sorted(a.keys() | b.keys()):
                    if a.get(key) != b.get(key):
                        return (
                            f"differs in header {key.decode(errors='replace')}: primary "
                            f"{_show(a.get(key))}, {name} {_show(b.get(key))}"
                        )
                return "differs in the order of its headers"
        if len(p[0]) != len(m[0]):
            return f"differs in its interim responses: {len(p[0])} heads, {name} {len(m[0])}"
        return "differs in its body, " + super().difference(p[1], m[1], name).replace(
            "its byte", "byte"
        )


def _show(value: bytes | None) -> str:
    return "(none)" if value is None else excerpt(value)


class HttpParser(ReplyParser):
    """Finds where one response ends: by the fast path where it reads the head, else
    with h11 (an h11 connection per response)."""

    def __init__(self, expect: HttpExpect) -> None:
        self.expect = expect
        self.conn: h11.Connection | None = None  # h11's, once the fast path gave up
        self.head = b""  # the response so far, while the fast path waits for its head
        self.left = -1  # bytes of a fast-path response still to come
        self.fed = 0  # bytes of the response given to h11 so far

    def feed(self, data: bytes, pos: int) -> int:
        if self.left >= 0:
            n = len(data) - pos
            if n >= self.left:
                end = pos + self.left
                self.left = 0
                return end
            self.left -= n
            return MORE
        if self.conn is None:
            if self.expect.fast:
                seen = self.head
                buf = seen + data[pos:] if seen else data
                start = 0 if seen else pos
                head = _response_head(buf, start)
                if head is not None:
                    end = _fast_end(head, self.expect.request.method)
                    if end >= 0:
                        # (offsets in ``buf``; back to ``data``'s: ``seen`` came before pos)
                        end_in_data = end - len(seen) + pos if seen else end
                        self.head = b""
                        if end_in_data <= len(data):
                            return end_in_data
                        self.left = end_in_data - len(data)
                        return MORE
                elif (
                    buf.find(b"\r\n\r\n", start) < 0
                    and len(buf) - start < FAST_HEAD_LIMIT
                    and b"HTTP/".startswith(buf[start : start + 5])
                ):
                    self.head = buf[start:]  # a status line, the head not all here yet
                    return MORE
            self.conn = self.expect.client()
            if self.head:
                # h11 reads from the response's start: the bytes held first.
                seen, self.head = self.head, b""
                return self._h11(seen + data[pos:], len(seen), pos)
        return self._h11(data[pos:], 0, pos)

    def _h11(self, chunk: bytes, held: int, pos: int) -> int:
        """Feed h11 ``chunk`` (the first ``held`` bytes of it came before ``data[pos]``);
        where the response ends in ``data``, MORE or GARBAGE."""
        conn = self.conn
        assert conn is not None
        before = self.fed
        self.fed += len(chunk)
        try:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                    # (PAUSED: 101 Switching Protocols, the response ended)
                    length = self.fed - len(conn.trailing_data[0])
                    return pos + length - before - held
                if event is h11.NEED_DATA:
                    return MORE
        except h11.ProtocolError:
            return GARBAGE

    def finish(self) -> bool:
        """The connection closed: a close-delimited body ends here."""
        if self.conn is None:
            return False  # (the fast path reads no close-delimited body)
        try:
            self.conn.receive_data(b"")
            while True:
                event = self.conn.next_event()
                if isinstance(event, h11.EndOfMessage):
                    return True
                if (
                    event is h11.NEED_DATA
                    or event is h11.PAUSED
                    or isinstance(event, h11.ConnectionClosed)
                ):
                    return False
        except h11.ProtocolError:
            return False


class HttpFraming(Framing):
    """Frames one session's HTTP/1.1."""

    def __init__(self, ignore: frozenset[bytes], *, fast: bool = True) -> None:
        super().__init__()
        self.ignore = ignore
        #: Messages the fast path reads are not given to h11 (False: all are, for tests).
        self.fast = fast
        self._conn: h11.Connection | None = None  # the request being read
        self._queued = False  # its expectation is queued already
        self._reply: HttpParser | None = None

    def request(self, data: bytes) -> None:
        while data and not self.deaf:
            conn = self._conn
            if conn is None and self.fast:  # (between requests: the fast path may read it)
                stop = data.find(b"\r\n\r\n", 0, FAST_HEAD_LIMIT)
                key = (self.ignore, data[: stop + 4])
                known = _REQUESTS.get(key) if stop >= 0 else None
                if known is not None and len(data) >= stop + 4 + known[1]:
                    self.queue(known[0])  # (a head read before: the same expectation)
                    data = data[stop + 4 + known[1] :]
                    continue
                head = fast_head(data, 0, True)
                if (
                    head is not None
                    and head.first[0] != b"CONNECT"
                    and len(data) >= head.end + max(head.length, 0)
                    and head.first[2] == b"1.1"
                    and not any(
                        k in (b"upgrade", b"expect")
                        or (k == b"connection" and b"close" in v.lower())
                        for k, v in head.headers
                    )
                ):
                    # (Not the last request of a connection, HTTP/1.0's or one that
                    # says close: h11 reads no request after it, nor does the fast path.)
                    expect = HttpExpect(FastRequest(head), self.ignore, False)
                    length = max(head.length, 0)
                    if len(_REQUESTS) >= HEADS_KEPT:
                        _REQUESTS.clear()
                    _REQUESTS[key] = (expect, length)
                    self.queue(expect)
                    data = data[head.end + length :]
                    continue
            if conn is None:
                conn = self._conn = h11.Connection(h11.SERVER)
                self._queued = False
            try:
                conn.receive_data(data)
                data = b""
                while True:
                    event = conn.next_event()
                    if isinstance(event, h11.Request):
                        req: Any = event  # (read untyped: see HttpExpect.read)
                        self._queued = True
                        switches = req.method == b"CONNECT" or any(
                            name == b"upgrade" for name, _ in req.headers
                        )
                        self.queue(HttpExpect(req, self.ignore, switches, self.fast))
                        if switches:
                            self.stop()  # what follows is another protocol
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        data = bytes(conn.trailing_data[0])
                        self._conn = None
                        break
                    elif event is h11.NEED_DATA:
                        return
                    elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                        self._conn = None
                        return
            except h11.ProtocolError:
                self.stop()  # the server answers 400 and closes; nothing to model
                return

    def begin(self, data: bytes, pos: int) -> Expect | None:
        if self.lost:
            return None
        expect = self.expect_next()
        if expect is not None:
            assert isinstance(expect, HttpExpect)
            self._reply = HttpParser(expect)
        return expect

    def feed(self, data: bytes, pos: int) -> int:
        assert self._reply is not None
        return self._reply.feed(data, pos)

    def finish(self) -> bool:
        return self._reply is not None and self._reply.finish()

    def parser(self, expect: Expect) -> ReplyParser:
        assert isinstance(expect, HttpExpect)
        return HttpParser(expect)


#: Request heads the fast path read, by (ignored headers, the head's bytes): the
#: expectation of its response (shared, as Expects are) and the body's length.
_REQUESTS: Final[dict[tuple[frozenset[bytes], bytes], tuple[HttpExpect, int]]] = {}
#: Response heads the fast path read (without their headers), by the head's bytes
#: up to its blank line: its status line's parts and the body's length.
_RESPONSES: Final[dict[bytes, tuple[tuple[bytes, ...], int]]] = {}


def _response_head(buf: bytes, start: int) -> FastHead | None:
    """``fast_head(buf, start, False, keep=False)``, remembered by the head's bytes."""
    stop = buf.find(b"\r\n\r\n", start, start + FAST_HEAD_LIMIT)
    if stop < 0:
        return None
    key = buf[start:stop]
    known = _RESPONSES.get(key)
    if known is not None:
        return FastHead(known[0], [], stop + 4, known[1])
    head = fast_head(buf, start, False, keep=False)
    if head is not None:
        if len(_RESPONSES) >= HEADS_KEPT:
            _RESPONSES.clear()
        _RESPONSES[key] = (head.first, head.length)
    return head


def ignored(names: Any) -> frozenset[bytes]:
    """Header names to ignore, as h11 spells them (lowercase bytes)."""
    return frozenset(str(name).lower().encode() for name in names)
