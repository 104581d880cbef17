"""PostgreSQL's wire protocol (v3): requests and replies as messages, and their rules.

A reply is every message the server sends up to ``ReadyForQuery`` (``Z``): the
answer to the startup (authentication, ``ParameterStatus``, ``BackendKeyData``),
to a simple query (``Q``), to the extended protocol's ``Sync`` (``S``), or to a
function call (``F``); or up to an ``ErrorResponse`` with severity FATAL or
PANIC, after which the server closes. A ``COPY ... FROM STDIN`` splits its reply
at the ``CopyInResponse`` (the client sends its data only once it has that): the
rest answers the client's ``CopyDone`` or ``CopyFail``. The client's other messages (``Parse``,
``Bind``, ..., ``CopyData``, password and SASL responses) get no reply of their
own.

Replies are compared message by message: ``BackendKeyData`` (the backend's pid
and a random cancel key) and ``NoticeResponse`` (text for people) are left out,
as are the ``ParameterStatus`` messages named in ``[protocol.postgres]
ignore_parameters``; everything else is exact. A login by challenge (MD5's salt,
SCRAM's nonce) answers each server with its own challenge: the client's proof
fits the primary only, the replica refuses, and the divergence line says so.

The requests that come before the startup (``SSLRequest``, ``GSSENCRequest``,
``CancelRequest``) are not framed here: the proxy answers the first two itself
(``N``: it cannot mirror an encrypted stream) and carries out the third against
every backend (see :func:`preamble`).
"""

from __future__ import annotations

from typing import Final

from replicaproxy.core.framing import (
    GARBAGE,
    MORE,
    Expect,
    Framing,
    ReplyParser,
    excerpt,
    recognise,
)

SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
CANCEL_REQUEST: Final = 80877102
#: Protocol 3.0 in a StartupMessage (3.x: the major version in the high 16 bits).
PROTOCOL_3: Final = 3
#: PostgreSQL's own bound on a startup packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP: Final = 10000
#: A message longer than this is not PostgreSQL's (its messages are at most 1 GB).
MAX_MESSAGE: Final = 1 << 30

#: Authentication requests that carry a per-connection challenge.
_CHALLENGES: Final = {5: "MD5", 10: "SASL (SCRAM)", 11: "SASL (SCRAM)"}
#: Client messages that begin a reply (ReadyForQuery ends it).
_REPLIED: Final = frozenset(b"QSF")
#: What ends a reply: ReadyForQuery, or CopyInResponse (the server waits for the
#: client's data, which comes once the client has read it: the rest, up to
#: ReadyForQuery, answers the client's CopyDone or CopyFail). (This and the next:
#: two types each, which PgParser.feed compares with one by one.)
_ENDS: Final = b"ZG"
#: What ends the answer to a CopyDone or CopyFail sent in the extended protocol: its
#: CommandComplete or ErrorResponse (the ReadyForQuery answers the Sync after it).
_COPY_ENDS_EXTENDED: Final = b"CE"
#: Server messages that may come at any time, not in answer to anything.
_ASYNC: Final = frozenset(b"ANS")
#: How much of a Query's or Parse's text is kept for its label (which shows 60
#: characters of it, its whitespace runs made one space).
_TEXT_KEPT: Final = 200


def _int32(data: bytes, at: int) -> int:
    """The big-endian 32-bit integer at ``data[at : at + 4]`` (the caller checked that
    the 4 bytes are there). Read byte by byte: compiled, that is a few native
    operations, where ``int.from_bytes`` makes a slice and a call (bench/README.md,
    "Protocols")."""
    return (data[at] << 24) | (data[at + 1] << 16) | (data[at + 2] << 8) | data[at + 3]


def messages(reply: bytes) -> list[tuple[int, bytes]] | None:
    """A whole reply as (type, body) messages; None if it is not one."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    n = len(reply)
    while pos < n:
        if pos + 5 > n:
            return None
        length = _int32(reply, pos + 1)
        if length < 4 or pos + 1 + length > n:
            return None
        out.append((reply[pos], reply[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def _fields(body: bytes) -> dict[int, bytes]:
    """An ErrorResponse's or NoticeResponse's fields, by their one-byte code."""
    out: dict[int, bytes] = {}
    for part in body.split(b"\x00"):
        if part:
            out[part[0]] = part[1:]
    return out


def fatal(body: bytes) -> bool:
    """Whether an ErrorResponse's body says the server closes the connection now."""
    severity = _fields(body).get(0x56) or _fields(body).get(0x53)  # V (unlocalised), S
    return severity in (b"FATAL", b"PANIC")


class PgExpect(Expect):
    """A reply and how two of them compare: message by message, some left out."""

    def __init__(
        self,
        label: str,
        ignore_parameters: frozenset[bytes],
        ends_at: bytes = _ENDS,
        sql: bytes = b"",
    ) -> None:
        super().__init__(label, "postgres")
        #: A Query's text, its first _TEXT_KEPT bytes: its label is made of it (up to
        #: its NUL) when first asked for (most are never).
        self.sql = sql
        self.ignore_parameters = ignore_parameters
        #: The message types that end the reply (besides a FATAL ErrorResponse).
        self.ends_at = ends_at
        # The startup's reply: its BackendKeyData is worth reporting (for cancels).
        self.learns = label == "startup"
        # Replies to queries are usually the same bytes from every server; the
        # startup's never are (BackendKeyData), and its key is learnt from each.
        self.in_place = not self.learns

    def name(self) -> str:
        sql = self.sql
        if sql:
            end = sql.find(0)
            if end != 0:
                self.label = f"{self.label} {_label(sql[:end] if end > 0 else sql)}"
            self.sql = b""
        return self.label

    def compared(self, reply: bytes) -> list[tuple[int, bytes]] | None:
        found = messages(reply)
        if found is None:
            return None
        return [
            (kind, body)
            for kind, body in found
            if kind not in (0x4B, 0x4E)  # K BackendKeyData, N NoticeResponse
            and not (kind == 0x53 and body.split(b"\x00", 1)[0] in self.ignore_parameters)
        ]

    def equivalent(self, primary: bytes, mirror: bytes) -> bool:
        if primary == mirror:
            return True
        p = self.compared(primary)
        return p is not None and p == self.compared(mirror)

    def difference(self, primary: bytes, mirror: bytes, name: str = "replica") -> str:
        p = self.compared(primary)
        m = self.compared(mirror)
        if p is None or m is None:
            return super().difference(primary, mirror, name)
        challenge = _challenge(p)
        for i, (ours, theirs) in enumerate(zip(p, m, strict=False)):
            if ours != theirs:
                where = (
                    f"differs in message {i + 1}: primary {_describe(*ours)}, "
                    f"{name} {_describe(*theirs)}"
                )
                if challenge:
                    where += (
                        f". The login is by {challenge} challenge, which each server makes "
                        "its own: the client's proof fits the primary only. Challenge-response "
                        "authentication cannot be mirrored; give the proxy's connections trust "
                        "or certificate authentication"
                    )
                return where
        return f"differs in length: {len(p)} messages from the primary, {len(m)} from {name}"

    def learn(self, reply: bytes) -> bytes | None:
        """The BackendKeyData (pid and key, 8 bytes) of a startup's reply."""
        for kind, body in messages(reply) or []:
            if kind == 0x4B and len(body) == 8:
                return body
        return None


def _challenge(found: list[tuple[int, bytes]]) -> str:
    for kind, body in found:
        if kind == 0x52 and len(body) >= 4 and _int32(body, 0) in _CHALLENGES:
            return _CHALLENGES[_int32(body, 0)]
    return ""


def _describe(kind: int, body: bytes) -> str:
    """One message, for a divergence line."""
    name = chr(kind)
    if kind in (0x45, 0x4E):  # E, N
        fields = _fields(body)
        severity = (fields.get(0x53) or b"").decode(errors="replace")
        text = (fields.get(0x4D) or b"").decode(errors="replace")
        return f"{name} {severity}: {text!r}"
    return f"{name} {excerpt(body)}"


class PgParser(ReplyParser):
    """Finds where one reply ends: at ReadyForQuery, or at a FATAL ErrorResponse."""

    def __init__(self, ends_at: bytes = _ENDS) -> None:
        self.body = bytearray()  # an ErrorResponse's body, kept to read its severity
        self.reset(ends_at)

    def reset(self, ends_at: bytes) -> None:
        """Ready for a new reply, which ends at one of ``ends_at``'s message types."""
        self.ends_at = ends_at
        self.head = b""  # the start of a message header the last chunk cut
        self.skip = 0  # bytes of a message body still to pass
        self.kind = 0  # the type of the message being passed
        self.fresh = True
        #: Bytes of the reply read so far (the last message's start is where FATAL is).
        self.read = 0
        #: Where (bytes from the reply's start) the FATAL ErrorResponse that ended the
        #: reply began; -1 if the reply ended with ReadyForQuery.
        self.fatal_at = -1
        self._start = 0  # where the current message began

    def feed(self, data: bytes, pos: int) -> int:
        self.fresh = False
        n = len(data)
        if not self.skip and not self.head:
            # Most replies (RowDescription, DataRows, CommandComplete, ReadyForQuery)
            # come whole in one chunk: their messages are passed here in a few native
            # operations each, up to an ErrorResponse (its severity is read below) or
            # a message cut; below, the place is kept in attributes at every step.
            ends_at = self.ends_at
            last, other = ends_at[0], ends_at[1]  # (``in ends_at`` would be a call)
            start = pos
            while pos + 5 <= n:
                kind = data[pos]
                length = _int32(data, pos + 1)
                end = pos + 1 + length
                if kind == 0x45 or end > n:
                    break  # an ErrorResponse (its severity is read below), or a message cut
                if not 4 <= length <= MAX_MESSAGE or not 0x31 <= kind <= 0x7A:
                    break  # not PostgreSQL's (said below)
                pos = end
                if kind in (last, other):
                    self.read += pos - start
                    return pos
            self.read += pos - start
        while True:
            if self.skip:
                take = min(self.skip, n - pos)
                if self.kind == 0x45:
                    self.body += data[pos : pos + take]
                pos += take
                self.read += take
                self.skip -= take
                if self.skip:
                    return MORE
                if self.kind == 0x45 and fatal(bytes(self.body)):
                    self.fatal_at = self._start
                    return pos
                if self.kind in self.ends_at:
                    return pos
                continue
            if pos >= n:
                return MORE
            if not self.head and pos + 5 <= n:  # the usual case: the header is all here
                kind = data[pos]
                length = _int32(data, pos + 1)
                pos += 5
                self.read += 5
            else:
                need = 5 - len(self.head)
                piece = data[pos : pos + need]
                self.head += piece
                pos += len(piece)
                self.read += len(piece)
                if len(self.head) < 5:
                    return MORE
                kind = self.head[0]
                length = _int32(self.head, 1)
                self.head = b""
            self._start = self.read - 5
            if length < 4 or length > MAX_MESSAGE or not 0x31 <= kind <= 0x7A:
                return GARBAGE
            self.kind = kind
            if kind == 0x45:  # (only an ErrorResponse's body is kept)
                self.body = bytearray()
            self.skip = length - 4
            if self.skip == 0:
                if kind in self.ends_at:
                    return pos
                continue


class PgFraming(Framing):
    """Frames one session's PostgreSQL traffic (after what :func:`preamble` handled)."""

    def __init__(self, ignore_parameters: frozenset[bytes]) -> None:
        super().__init__()
        self.ignore_parameters = ignore_parameters
        self._started = False  # the StartupMessage went by
        self._head = b""  # the start of a message header the last chunk cut
        self._skip = 0  # bytes of a message still to pass
        self._kind = 0
        self._query = bytearray()  # the start of a Query's or Parse's text, for labels
        self._last_sql = ""  # the last Parse's text: what a Sync's reply answers
        self._extended = False  # the last request that gets a reply was a Sync
        self._reply: PgParser | None = None
        self._expects: dict[str, PgExpect] = {}
        self.says_last_words = True

    def _expect(self, label: str, ends_at: bytes = _ENDS) -> PgExpect:
        found = self._expects.get(label)
        if found is None:
            found = PgExpect(label, self.ignore_parameters, ends_at)
            if len(self._expects) < 256:
                self._expects[label] = found
        return found

    def request(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        while pos < n and not self.deaf:
            if self._skip:
                take = min(self._skip, n - pos)
                if self._kind in (0x51, 0x50) and len(self._query) < _TEXT_KEPT:
                    self._query += data[pos : pos + min(take, _TEXT_KEPT - len(self._query))]
                pos += take
                self._skip -= take
                if not self._skip:
                    self._message_done()
                continue
            if self._started and not self._head and pos + 5 <= n:
                # The usual case: the message's header is all in this chunk.
                kind = data[pos]
                length = _int32(data, pos + 1)
                pos += 5
                if kind == 0x51 and 4 < length <= MAX_MESSAGE and length - 4 <= n - pos:
                    # The usual request, a whole Query in this chunk: its text sliced
                    # at once rather than gathered in _query as a message cut across
                    # chunks is (the same bytes: _message_done's Query).
                    self._kind = kind
                    self._extended = False
                    text = data[pos : pos + min(length - 4, _TEXT_KEPT)]
                    self.queue(PgExpect("Query", self.ignore_parameters, sql=text))
                    pos += length - 4
                    continue
            else:
                header = 8 if not self._started else 5
                need = header - len(self._head)
                piece = data[pos : pos + need]
                self._head += piece
                pos += len(piece)
                if len(self._head) < header:
                    return
                head = self._head
                self._head = b""
                if not self._started:
                    length = _int32(head, 0)
                    code = _int32(head, 4)
                    if code >> 16 != PROTOCOL_3 or not 8 <= length <= MAX_STARTUP:
                        self.stop()  # (SSL, GSS and cancels never reach here: see preamble)
                        return
                    self._started = True
                    self._kind = 0
                    self._skip = length - 8
                    self.queue(self._expect("startup"))
                    continue
                kind = head[0]
                length = _int32(head, 1)
            self._kind = kind
            if length < 4 or length > MAX_MESSAGE:
                self.stop()
                return
            self._query.clear()
            self._skip = length - 4
            if not self._skip:
                self._message_done()

    def _message_done(self) -> None:
        kind = self._kind
        if kind in (0x63, 0x66):  # c CopyDone, f CopyFail: the COPY's end is answered
            label = "CopyDone" if kind == 0x63 else "CopyFail"
            if self._extended:
                self.queue(self._expect(label + " (extended)", _COPY_ENDS_EXTENDED))
            else:
                self.queue(self._expect(label))
            return
        if kind not in _REPLIED and kind != 0x50:  # (0: the startup, queued already)
            return
        self._extended = kind == 0x53
        if kind == 0x51:  # Q: its text (the label is made of it if a log line asks)
            self.queue(PgExpect("Query", self.ignore_parameters, sql=bytes(self._query)))
            return
        text = bytes(self._query).split(b"\x00")
        if kind == 0x50:  # P Parse: name, then query text
            self._last_sql = _label(text[1] if len(text) > 1 else b"")
        elif kind == 0x53:  # S Sync
            self.queue(self._expect(f"Sync ({self._last_sql})" if self._last_sql else "Sync"))
        elif kind == 0x46:  # F FunctionCall
            self.queue(self._expect("FunctionCall"))

    def last_words(self, data: bytes, pos: int) -> bool:
        """An ErrorResponse that answers nothing: a FATAL (the only error PostgreSQL
        sends unasked: its postmaster died, or an administrator ended the session)."""
        return data[pos] == 0x45 and not self.has_pending() and not self.lost

    def begin(self, data: bytes, pos: int) -> Expect | None:
        if self.lost:
            return None
        if data[pos] in _ASYNC and not self.has_pending():
            self.lose()  # a notification between replies (LISTEN): not modelled
            return None
        expect = self.expect_next()
        if expect is not None:
            assert isinstance(expect, PgExpect)
            reply = self._reply
            if reply is None:
                self._reply = PgParser(expect.ends_at)
            else:
                reply.reset(expect.ends_at)  # (one parser for the primary's replies)
        return expect

    def feed(self, data: bytes, pos: int) -> int:
        assert self._reply is not None
        return self._reply.feed(data, pos)

    def ends(self) -> int:
        return -1 if self._reply is None else self._reply.fatal_at

    def parser(self, expect: Expect) -> ReplyParser:
        assert isinstance(expect, PgExpect)
        return PgParser(expect.ends_at)


def _label(sql: bytes) -> str:
    """A query's text, shortened, for log lines."""
    text = " ".join(sql.decode(errors="replace").split())
    return repr(text if len(text) <= 60 else text[:57] + "...")


# ------------------------------------------------------------------ preamble

#: What :func:`preamble` says to do with the client's first bytes.
NEED_MORE: Final = 0
ANSWER_NO: Final = 1  # a GSSENCRequest: answer "N" and drop the 8 bytes
CANCEL: Final = 2  # a CancelRequest: carry it out, then close the client
PASS: Final = 3  # a StartupMessage (or anything else): the session takes it
SSL: Final = 4  # an SSLRequest: "S" and a TLS handshake where the proxy has a certificate, else "N"


def preamble(head: bytes) -> int:
    """What the client's first bytes ask of the proxy itself (see :data:`PASS`)."""
    if len(head) < 8:
        return NEED_MORE
    code = _int32(head, 4)
    if _int32(head, 0) == 8 and code == SSL_REQUEST:
        return SSL
    if _int32(head, 0) == 8 and code == GSSENC_REQUEST:
        return ANSWER_NO
    if _int32(head, 0) == 16 and code == CANCEL_REQUEST:
        return CANCEL if len(head) >= 16 else NEED_MORE
    return PASS


def fatal_response(sqlstate: bytes, message: str) -> bytes:
    """A FATAL ErrorResponse, for what the proxy itself refuses before a session."""
    body = b"SFATAL\x00VFATAL\x00C" + sqlstate + b"\x00M" + message.encode() + b"\x00\x00"
    return b"E" + (4 + len(body)).to_bytes(4, "big") + body


def ssl_request() -> bytes:
    """An SSLRequest: what a client sends to ask a server for TLS."""
    return (8).to_bytes(4, "big") + SSL_REQUEST.to_bytes(4, "big")


def cancel_request(key: bytes) -> bytes:
    """A CancelRequest for ``key`` (the backend's pid and secret, 8 bytes)."""
    return (16).to_bytes(4, "big") + CANCEL_REQUEST.to_bytes(4, "big") + key


# ------------------------------------------------------------------ liveness

#: SQLSTATE cannot_connect_now: starting up, shutting down, in recovery.
_CANNOT_CONNECT_NOW: Final = b"57P03"


def liveness_request() -> bytes:
    """A StartupMessage for a check that the server still takes sessions."""
    params = b"user\x00replicaproxy\x00database\x00replicaproxy\x00"
    params += b"application_name\x00replicaproxy liveness check\x00\x00"
    return (8 + len(params)).to_bytes(4, "big") + (PROTOCOL_3 << 16).to_bytes(4, "big") + params


def liveness_verdict(answer: bytes) -> bool | str:
    """Whether the answer to :func:`liveness_request` says the server takes sessions:
    True for an authentication request or any refusal of this login (a role that
    does not exist is still an answer), a reason for "cannot connect now" (shutting
    down, starting up, in recovery), False while the first message is incomplete."""
    if len(answer) < 5:
        return False
    length = _int32(answer, 1)
    if answer[0] != 0x45:  # not an ErrorResponse: it answers (R, or anything else)
        return True
    if len(answer) < 1 + length:
        return False
    fields = _fields(answer[5 : 1 + length])
    if fields.get(0x43) == _CANNOT_CONNECT_NOW:  # C: the SQLSTATE
        return "it takes no sessions: " + (fields.get(0x4D) or b"").decode(errors="replace")
    return True


def _startup_opening(client: bytes) -> bool:
    return len(client) >= 8 and (
        _int32(client, 4) >> 16 == PROTOCOL_3 or _int32(client, 4) in (SSL_REQUEST, GSSENC_REQUEST)
    )


recognise("postgres", _startup_opening)
