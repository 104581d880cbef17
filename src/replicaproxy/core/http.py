"""HTTP/1.1: requests and responses as messages, framed by h11, compared by header.

Each request the client sends is read with an h11 server-side connection of its
own (so pipelined requests are read as they come); each response with an h11
client-side connection to which its request was replayed, so that h11 knows
what the response answers (HEAD, 1xx, close-delimited bodies). Responses are
compared by status, headers and decoded body (chunked or not); headers named in
``[protocol.http] ignore_headers`` (``date`` by default) may differ. ``Upgrade``
and ``CONNECT`` switch protocols: bytes are compared from there on.
"""

from __future__ import annotations

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


class HttpExpect(Expect):
    """The response a request expects, and how two responses to it compare."""

    def __init__(
        self,
        request: Any,
        ignore: frozenset[bytes],
        switches: bool,
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

    def client(self) -> h11.Connection:
        """An h11 client connection that has sent this request (its head)."""
        conn = h11.Connection(h11.CLIENT)
        request = self.request
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
    """Finds where one response ends, with h11 (an h11 connection per response)."""

    def __init__(self, expect: HttpExpect) -> None:
        self.expect = expect
        self.conn = expect.client()
        self.fed = 0  # bytes of the response given to h11 so far

    def feed(self, data: bytes, pos: int) -> int:
        before = self.fed
        chunk = data[pos:]
        self.fed += len(chunk)
        conn = self.conn
        try:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if isinstance(event, h11.EndOfMessage):
                    length = self.fed - len(conn.trailing_data[0])
                    return pos + length - before
                if event is h11.NEED_DATA:
                    return MORE
                if event is h11.PAUSED:  # (101 Switching Protocols: the response ended)
                    length = self.fed - len(conn.trailing_data[0])
                    return pos + length - before
        except h11.ProtocolError:
            return GARBAGE

    def finish(self) -> bool:
        """The connection closed: a close-delimited body ends here."""
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

    def __init__(self, ignore: frozenset[bytes]) -> None:
        super().__init__()
        self.ignore = ignore
        self._conn: h11.Connection | None = None  # the request being read
        self._queued = False  # its expectation is queued already
        self._reply: HttpParser | None = None

    def request(self, data: bytes) -> None:
        while data and not self.deaf:
            conn = self._conn
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
                        self.queue(HttpExpect(req, self.ignore, switches))
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


def ignored(names: Any) -> frozenset[bytes]:
    """Header names to ignore, as h11 spells them (lowercase bytes)."""
    return frozenset(str(name).lower().encode() for name in names)
