"""memcached's text protocol: requests and replies as messages, and how they compare.

Requests are lines (``get k1 k2``, ``set k 0 0 5`` with a data block after it, meta
commands ``mg``/``ms``/...); each gets one reply, or none with ``noreply`` (and
``quit``). Replies are one line, or for retrievals ``VALUE`` blocks closed by
``END``, for ``stats`` ``STAT`` lines closed by ``END``, for ``mg`` a ``VA`` line
and its data. ``stats`` and ``version`` answer each server's own counters and may
differ; the CAS unique of ``gets``/``gats`` (and ``mg``'s ``c`` flag) is each
server's own and is not compared, nor are ``mg``'s TTL and last-access flags
(``t``, ``l``). A ``cas`` command carries the primary's unique, which the replica
does not know: its answer differs, a real divergence (README "Protocols").
The binary protocol, quiet meta commands (flag ``q``) and ``watch`` are not
modelled: bytes are compared from there on.
"""

from __future__ import annotations

from typing import Final

from replicaproxy.core.framing import (
    GARBAGE,
    MORE,
    Expect,
    Framing,
    ReplyParser,
)

#: memcached's longest request line (KEY_MAX_LENGTH 250 plus the rest); past it the
#: server answers an error and may close.
MAX_LINE: Final = 8192
#: The largest item memcached stores by default is 1 MiB (-I); a data block past
#: this many bytes is not memcached's.
MAX_DATA: Final = 1 << 30

#: Commands followed by a data block: NAME KEY FLAGS EXPTIME BYTES [CAS] [noreply].
_STORAGE: Final = frozenset({b"set", b"add", b"replace", b"append", b"prepend", b"cas"})
#: Retrievals: VALUE blocks, then END.
_RETRIEVAL: Final = frozenset({b"get", b"gets", b"gat", b"gats"})
#: Their replies carry each server's CAS unique.
_WITH_CAS: Final = frozenset({b"gets", b"gats"})
#: Meta commands (memcached 1.6): one reply each unless quiet.
_META: Final = frozenset({b"mg", b"ms", b"md", b"ma", b"mn", b"me"})
#: Commands with no reply at all.
_SILENT: Final = frozenset({b"quit"})
#: Commands that a last word ``noreply`` silences (those that call memcached's
#: set_noreply_maybe, as memcached 1.6.18 answers them). For any other, ``noreply``
#: is an argument (``get k noreply`` reads two keys, and answers).
_NOREPLY: Final = (
    _STORAGE
    | frozenset({b"delete", b"incr", b"decr", b"touch", b"verbosity", b"flush_all"})
    | frozenset({b"cache_memlimit", b"slabs", b"lru"})
)
#: Commands after which replies no longer pair with requests: a stream of log lines.
_UNMODELLED: Final = frozenset({b"watch"})

# Reply shapes.
LINE: Final = 0  # one line
VALUES: Final = 1  # VALUE blocks, END
STATS: Final = 2  # STAT lines, END
META_GET: Final = 3  # VA line and data, or one line


class McExpect(Expect):
    """The reply a memcached request expects: its shape, and how it compares."""

    def __init__(self, label: str, kind: str, shape: int, cas_at: int = -1) -> None:
        super().__init__(label, kind)
        self.shape = shape
        #: VALUE lines: the field that holds the CAS unique (not compared); -1: none.
        self.cas_at = cas_at

    def equivalent(self, primary: bytes, mirror: bytes) -> bool:
        if self.ignored or primary == mirror:
            return True
        if self.shape == VALUES and self.cas_at >= 0:
            return _without_cas(primary, self.cas_at) == _without_cas(mirror, self.cas_at)
        if self.shape == META_GET:
            return _meta_fields(primary) == _meta_fields(mirror)
        return False

    def difference(self, primary: bytes, mirror: bytes, name: str = "replica") -> str:
        if self.shape == VALUES and self.cas_at >= 0:
            return super().difference(
                _without_cas(primary, self.cas_at), _without_cas(mirror, self.cas_at), name
            )
        return super().difference(primary, mirror, name)


def _without_cas(reply: bytes, at: int) -> bytes:
    """A retrieval reply with each VALUE line's CAS unique left out."""
    out = bytearray()
    pos = 0
    n = len(reply)
    while pos < n:
        end = reply.find(b"\r\n", pos)
        if end < 0:
            return reply  # (not a whole reply: compared as it is)
        line = reply[pos:end]
        pos = end + 2
        words = line.split(b" ")
        if words[0] == b"VALUE" and len(words) > at:
            del words[at]
            out += b" ".join(words) + b"\r\n"
            try:
                size = int(line.split(b" ")[3])
            except (IndexError, ValueError):
                return reply
            out += reply[pos : pos + size + 2]
            pos += size + 2
        else:
            out += line + b"\r\n"
    return bytes(out)


def _meta_fields(reply: bytes) -> bytes:
    """An ``mg`` reply without the flags that are each server's own: CAS (``c``),
    TTL left (``t``) and time since last access (``l``)."""
    end = reply.find(b"\r\n")
    if end < 0:
        return reply
    words = [w for w in reply[:end].split(b" ") if w[:1] not in (b"c", b"t", b"l")]
    return b" ".join(words) + reply[end:]


class McParser(ReplyParser):
    """Finds where one memcached reply of a given shape ends."""

    def __init__(self, shape: int) -> None:
        self.reset(shape)

    def reset(self, shape: int) -> None:
        """Ready for a new reply of ``shape``."""
        self.shape = shape
        self.line = b""  # the start of a line the last chunk cut
        self.skip = 0  # bytes of a data block (with its CRLF) still to pass
        self.done_after_skip = False  # the data block ends the reply (mg's VA)

    def feed(self, data: bytes, pos: int) -> int:
        n = len(data)
        if self.shape == LINE and not self.line and not self.skip:
            # A one-line reply (STORED, DELETED, a number, an error), whole here: its
            # end is all that matters. (_line answers 1 for every line of this shape.)
            end = data.find(b"\n", pos)
            if end >= 0:
                return end + 1
        while True:
            if self.skip:
                take = self.skip if self.skip < n - pos else n - pos
                pos += take
                self.skip -= take
                if self.skip:
                    return MORE
                if self.done_after_skip:
                    return pos
                continue
            if pos >= n:
                return MORE
            end = data.find(b"\n", pos)
            if end < 0:
                if len(self.line) + n - pos > MAX_LINE:
                    return GARBAGE
                self.line += data[pos:]
                return MORE
            line = (self.line + data[pos:end]).rstrip(b"\r")
            self.line = b""
            pos = end + 1
            verdict = self._line(line)
            if verdict == 1:
                return pos
            if verdict < 0:
                return GARBAGE

    def _line(self, line: bytes) -> int:
        """1: the reply ended with this line; 0: it goes on; -1: not a reply."""
        if line == b"END" and self.shape != META_GET:
            return 1  # (the usual end of a retrieval or stats reply)
        word = line.split(b" ", 1)[0]
        if word in (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"):
            return 1
        shape = self.shape
        if shape == LINE:
            return 1
        if shape == META_GET:
            if word == b"VA":
                size = _field(line, 1)
                if size < 0:
                    return -1
                self.skip = size + 2
                self.done_after_skip = True
                return 0
            return 1
        if word == b"END" or (shape == STATS and word == b"RESET"):
            return 1
        if shape == VALUES and word == b"VALUE":
            size = _field(line, 3)
            if size < 0:
                return -1
            self.skip = size + 2
            return 0
        if shape == STATS and word in (b"STAT", b"ITEM"):
            return 0
        return 1 if shape == STATS else -1  # (stats subcommands answer other lines too)


def _is_get(data: bytes, pos: int, end: int) -> bool:
    """Whether the line from ``data[pos]`` to ``end`` (its LF, or -1) is a ``get``."""
    return (
        end - pos > 4
        and data[pos] == 0x67  # g
        and data[pos + 1] == 0x65  # e
        and data[pos + 2] == 0x74  # t
        and data[pos + 3] == 0x20
    )


def _values_end(data: bytes, pos: int) -> int:
    """Where the retrieval reply at ``data[pos]`` ends, if all of it is there and it
    is the usual kind (``VALUE KEY FLAGS BYTES [CAS]`` lines with their data, then
    END); -1 otherwise, and the parser reads it. (Most replies are: they are read
    with a search for each key's end instead of a split and a parse per line.)"""
    n = len(data)
    i = pos
    while i + 5 <= n:
        if data[i] == 0x45:  # E
            ends = data[i + 1] == 0x4E and data[i + 2] == 0x44  # ND
            return i + 5 if ends and data[i + 3] == 13 and data[i + 4] == 10 else -1
        if not data.startswith(b"VALUE ", i):
            return -1
        i = data.find(b" ", i + 6)  # the key's end
        if i < 0:
            return -1
        flags, i = _number(data, i + 1, 0x20)
        if flags < 0:
            return -1
        size, i = _number(data, i, 0x0D)  # (then a CAS unique or the line's end)
        if size < 0:
            return -1
        if data[i - 1] == 0x20:  # the CAS unique
            i = data.find(b"\r\n", i)
            if i < 0:
                return -1
            i += 2
        elif i >= n or data[i] != 10:
            return -1
        else:
            i += 1
        i += size + 2  # the data and its CRLF
    return -1


def _number(data: bytes, i: int, stop: int) -> tuple[int, int]:
    """The field of 1 to 12 digits at ``data[i]`` ended by a space or by ``stop``: its
    value and where what follows its end begins; ``(-1, -1)`` if there is none."""
    n = len(data)
    j = i
    value = 0
    while j < n and j - i < 13:
        c = data[j]
        if c == 0x20 or c == stop:  # noqa: PLR1714 (compiled: two compares, no tuple)
            if j == i or j - i > 12:
                return -1, -1
            return value, j + 1
        if c < 0x30 or c > 0x39:
            return -1, -1
        value = value * 10 + c - 0x30
        j += 1
    return -1, -1


def _field(line: bytes, at: int) -> int:
    """The non-negative integer field ``at`` of ``line``; -1 if there is none."""
    words = line.split(b" ")
    if len(words) <= at or not words[at].isdigit() or len(words[at]) > 12:
        return -1
    return int(words[at])


class McFraming(Framing):
    """Frames one session's memcached text protocol."""

    def __init__(self) -> None:
        super().__init__()
        self._line = b""  # a request line the last chunk cut
        self._skip = 0  # bytes of a storage command's data block still to pass
        self._reply: McParser | None = None
        self._expects: dict[tuple[bytes, bool], McExpect] = {}
        self._get = self._expect(b"get", VALUES)

    def request(self, data: bytes) -> None:
        if self.deaf:
            return
        pos = 0
        n = len(data)
        if not self._line and not self._skip and data[:1] == b"\x80":
            self.stop()  # the binary protocol
            return
        while pos < n:
            if self._skip:
                take = self._skip if self._skip < n - pos else n - pos
                pos += take
                self._skip -= take
                continue
            end = data.find(b"\n", pos)
            if _is_get(data, pos, end) and not self._line:
                # Most requests are gets: one reply of VALUE blocks and END, whatever
                # the keys (the line is not split).
                self.queue(self._get)
                pos = end + 1
                continue
            if end < 0:
                self._line += data[pos:]
                if len(self._line) > MAX_LINE:
                    self.stop()  # the server answers an error (and may close)
                return
            line = (self._line + data[pos:end]).rstrip(b"\r")
            self._line = b""
            pos = end + 1
            if not self._command(line):
                self.stop()
                return

    def _command(self, line: bytes) -> bool:
        """Queue what one request line expects; False where pairing is lost."""
        words = line.split()
        if not words:
            self.queue(self._expect(b"", LINE))  # memcached answers ERROR
            return True
        command = words[0].lower()
        quiet = words[-1] == b"noreply" and command in _NOREPLY
        if command in _STORAGE:
            size = int(words[4]) if len(words) > 4 and words[4].isdigit() else -1
            if size < 0 or size > MAX_DATA:
                return False  # CLIENT_ERROR bad command line format: not modelled
            self._skip = size + 2
        elif command == b"ms":
            size = int(words[2]) if len(words) > 2 and words[2].isdigit() else -1
            if size < 0 or size > MAX_DATA:
                return False
            self._skip = size + 2
        if command in _UNMODELLED:
            return False
        if command in _META and b"q" in words[2:]:
            return False  # quiet mode: some replies are left out
        if quiet or command in _SILENT:
            return True
        if command in _RETRIEVAL:
            self.queue(self._expect(command, VALUES))
        elif command == b"stats":
            self.queue(self._expect(command, STATS))
        elif command == b"mg":
            self.queue(self._expect(command, META_GET))
        else:
            self.queue(self._expect(command, LINE))
        return True

    def _expect(self, command: bytes, shape: int) -> McExpect:
        key = (command, shape == VALUES)
        found = self._expects.get(key)
        if found is None:
            label = command.decode(errors="replace").upper() or "(empty line)"
            if command in (b"stats", b"version"):
                found = McExpect(label, "ignore", shape)
            elif command in _WITH_CAS:
                found = McExpect(label, "no_cas", shape, cas_at=4)
            elif command == b"mg":
                found = McExpect(label, "no_cas", shape)
            else:
                found = McExpect(label, "exact", shape)
            if len(self._expects) < 64:
                self._expects[key] = found
        return found

    def begin(self, data: bytes, pos: int) -> Expect | None:
        if self.lost:
            return None
        expect = self.expect_next()
        if expect is not None:
            assert isinstance(expect, McExpect)
            reply = self._reply
            if reply is None:
                self._reply = McParser(expect.shape)
            else:
                reply.reset(expect.shape)  # (one parser for the primary's replies)
        return expect

    def whole_reply(self, expect: Expect, data: bytes, pos: int) -> int:
        if not isinstance(expect, McExpect):
            return -1
        if expect.shape == VALUES:
            return _values_end(data, pos)
        if expect.shape == LINE:
            end = data.find(b"\n", pos)
            return end + 1 if end >= 0 else -1
        return -1

    def feed(self, data: bytes, pos: int) -> int:
        reply = self._reply
        assert reply is not None
        if reply.shape == VALUES and not reply.skip and not reply.line:
            # Between lines of a retrieval reply (its start, most often): the rest
            # of it, if whole, at once.
            end = _values_end(data, pos)
            if end > 0:
                return end
        return reply.feed(data, pos)

    def parser(self, expect: Expect) -> ReplyParser:
        assert isinstance(expect, McExpect)
        return McParser(expect.shape)
