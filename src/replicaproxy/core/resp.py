"""RESP (Redis, Valkey, KeyDB, ...): requests and replies as messages, and the rules
that compare a replica's reply with the primary's.

Requests are multibulk (``*3\\r\\n$3\\r\\nSET\\r\\n...``) or inline (``PING\\r\\n``);
replies are RESP2 or RESP3 values, whatever ``HELLO`` chose. Each request that
gets a reply queues the :class:`~replicaproxy.core.framing.Expect` of its
command; the framer models the states that change how many replies come back:
``MULTI``/``EXEC``/``DISCARD`` (queued commands answer ``+QUEUED``; ``EXEC``
answers an array of their replies, each compared under its command's rule),
``CLIENT REPLY OFF|ON|SKIP`` and ``RESET``. Pub/sub, ``MONITOR``, replication and
RESP3 pushes (replies that answer no request) are not modelled: the session
compares bytes from there on (:attr:`~replicaproxy.core.framing.Framing.lost`).

A request is read for its first arguments only (the command, a subcommand, a
``SCAN`` cursor); every other argument is skipped by its length, never copied.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

from replicaproxy.core.framing import (
    GARBAGE,
    MORE,
    Expect,
    Framing,
    ReplyParser,
    excerpt,
    recognise,
)

if TYPE_CHECKING:
    # Compiled, the offsets of the hot path are native 64-bit integers, with none of
    # the tag checks of an int; interpreted, the annotation is all there is.
    from mypy_extensions import i64

#: Redis refuses an inline request or a multibulk header longer than this
#: (PROTO_INLINE_MAX_SIZE): past it the server has answered an error and closed.
MAX_LINE: Final = 64 * 1024
#: Redis's default proto-max-bulk-len (512 MB); a larger length is garbage.
MAX_BULK: Final = 512 * 1024 * 1024
#: Redis refuses a multibulk of more arguments than this ("invalid multibulk length").
MAX_ARGS: Final = 1024 * 1024
#: The most elements of one aggregate a reply may announce before it is called garbage.
MAX_ELEMENTS: Final = 1 << 32


class RespParser(ReplyParser):
    """Finds where one RESP2 or RESP3 value ends, across any number of chunks."""

    def __init__(self) -> None:
        self.left: list[int] = []  # elements still to read, per open aggregate
        self.attr: list[bool] = []  # that aggregate is an attribute: its value follows it
        self.skip = 0  # bytes of a bulk payload (with its CRLF) still to pass
        self.line = b""  # the start of a header line the last chunk cut
        self.fresh = True  # nothing of the reply read yet

    def reset(self) -> None:
        self.left.clear()
        self.attr.clear()
        self.skip = 0
        self.line = b""
        self.fresh = True

    def feed(self, data: bytes, pos: int) -> int:
        self.fresh = False
        n = len(data)
        while True:
            skip = self.skip
            if skip:
                if n - pos < skip:
                    self.skip = skip - (n - pos)
                    return MORE
                pos += skip
                self.skip = 0
                if self._element_done():
                    return pos
                continue
            if pos >= n:
                return MORE
            if self.line:
                joined = self.line + data[pos : pos + MAX_LINE + 2]
                end = joined.find(b"\r\n")
                if end < 0:
                    if len(joined) > MAX_LINE:
                        return GARBAGE
                    self.line = joined
                    return MORE
                header = joined[:end]
                pos += end + 2 - len(self.line)
                self.line = b""
            else:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if n - pos > MAX_LINE:
                        return GARBAGE
                    self.line = data[pos:]
                    return MORE
                header = data[pos:end]
                pos = end + 2
            kind = header[0] if header else 0
            if kind in _SIMPLE:
                if self._element_done():
                    return pos
                continue
            try:
                count = int(header[1:])
            except ValueError:
                return GARBAGE
            if kind in _BULK:
                if count == -1:
                    if self._element_done():
                        return pos
                    continue
                if not 0 <= count <= MAX_BULK:
                    return GARBAGE
                self.skip = count + 2
                continue
            if kind in _AGGREGATE:
                if kind == 0x25:  # % map: a key and a value per entry
                    count *= 2
                if count <= 0:
                    if count < -1:
                        return GARBAGE
                    if self._element_done():  # empty, or null (*-1)
                        return pos
                    continue
                if count > MAX_ELEMENTS:
                    return GARBAGE
                self.left.append(count)
                self.attr.append(False)
                continue
            if kind == 0x7C:  # | attribute: key/value pairs, then the value they describe
                if count < 0 or count > MAX_ELEMENTS:
                    return GARBAGE
                if count:
                    self.left.append(2 * count)
                    self.attr.append(True)
                continue
            return GARBAGE

    def _element_done(self) -> bool:
        """One value ended: close the aggregates it completes. True: the reply ended."""
        left = self.left
        while left:
            left[-1] -= 1
            if left[-1] > 0:
                return False
            left.pop()
            if self.attr.pop():
                return False  # an attribute is not an element: its value comes next
        return True


# Type bytes: + - : _ , # ( are one line; $ ! = carry a payload; * ~ > % hold elements.
_SIMPLE: Final = frozenset(b"+-:_,#(")
_BULK: Final = frozenset(b"$!=")
_AGGREGATE: Final = frozenset(b"*~>%")


#: How much of a one-line reply _simple_end reads byte by byte.
_SHORT_LINE: Final = 32


def _simple_end(data: bytes, pos: i64) -> i64:
    """Where a one-line or bulk-string reply at ``data[pos]`` ends, if all of it is
    there; -1 for anything else (the parser reads that)."""
    n: i64 = len(data)
    kind: i64 = data[pos]
    if kind == 0x2B or kind == 0x2D or kind == 0x3A:  # + - :  # noqa: PLR1714 (per reply)
        # A short line is looked through here (bytes.find is a call by name when
        # compiled), a longer one from where that stopped.
        i = pos + 1
        stop = min(n - 1, pos + _SHORT_LINE)
        while i < stop:
            if data[i] == 13 and data[i + 1] == 10:
                return i + 2
            i += 1
        end = data.find(b"\r\n", i, pos + MAX_LINE)
        return end + 2 if end > 0 else -1
    if kind != 0x24:  # $
        return -1
    i = pos + 1
    if i < n and data[i] == 0x2D:  # $-1: null
        if data[pos : pos + 5] != b"$-1\r\n":
            return -1
        return pos + 5  # (statements: a conditional of an i64 and -1 is boxed)
    length: i64 = 0
    while i < n and 0x30 <= data[i] <= 0x39 and length <= MAX_BULK:
        length = length * 10 + data[i] - 0x30
        i += 1
    if i == pos + 1 or length > MAX_BULK or i + 1 >= n or data[i] != 13 or data[i + 1] != 10:
        return -1
    end = i + 2 + length + 2
    if end > n:
        return -1
    return end


def value_end(buf: bytes, at: int) -> int:
    """Where the value that starts at ``buf[at]`` ends; negative if it is cut or garbage."""
    return RespParser().feed(buf, at)


def elements(reply: bytes) -> tuple[bytes, list[bytes]] | None:
    """A whole aggregate reply as (its head, the encoding of each top-level element).

    The head is an attribute, if any, and the type byte; None when the reply is no
    aggregate (a simple string, an error, a null) or cannot be read.
    """
    at = 0
    if reply[:1] == b"|":
        at = _attribute_end(reply)
        if at < 0:
            return None
    end = reply.find(b"\r\n", at)
    if end < 0 or reply[at : at + 1] not in (b"*", b"~", b"%", b">"):
        return None
    try:
        count = int(reply[at + 1 : end])
    except ValueError:
        return None
    if count < 0:
        return None
    if reply[at : at + 1] == b"%":
        count *= 2
    head = reply[: at + 1]
    items: list[bytes] = []
    pos = end + 2
    for _ in range(count):
        stop = value_end(reply, pos)
        if stop < 0:
            return None
        items.append(reply[pos:stop])
        pos = stop
    return head, items


def _attribute_end(reply: bytes) -> int:
    """Where the attribute that opens ``reply`` ends (its value starts there)."""
    end = reply.find(b"\r\n")
    try:
        count = 2 * int(reply[1:end])
    except ValueError:
        return -1
    pos = end + 2
    for _ in range(count):
        pos = value_end(reply, pos)
        if pos < 0:
            return -1
    return pos


def _both(primary: bytes, mirror: bytes) -> tuple[bytes, list[bytes], list[bytes]] | None:
    """Both replies' top-level elements, where both are aggregates with the same head."""
    p = elements(primary)
    m = elements(mirror)
    if p is None or m is None or p[0] != m[0]:
        return None
    return p[0], p[1], m[1]


def _pairs(items: list[bytes]) -> list[tuple[bytes, bytes]] | None:
    if len(items) % 2:
        return None
    return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]


def _show(item: bytes) -> str:
    """An element as a log line shows it: a bulk string's payload, else its encoding."""
    if item[:1] == b"$":
        end = item.find(b"\r\n")
        return excerpt(item[end + 2 : -2])
    return excerpt(item)


class Unordered(Expect):
    """Replies whose elements come in each server's own order: compared as multisets.

    ``pairs``: the elements are field/value pairs (``HGETALL`` in RESP2); RESP3
    maps are compared as pairs in any case.
    """

    def __init__(self, label: str, pairs: bool = False) -> None:
        super().__init__(label, "unordered")
        self.pairs = pairs

    def equivalent(self, primary: bytes, mirror: bytes) -> bool:
        if primary == mirror:
            return True
        both = _both(primary, mirror)
        if both is None:
            return False
        head, ours, theirs = both
        return _same_multiset(ours, theirs, self.pairs or head.endswith(b"%"))

    def difference(self, primary: bytes, mirror: bytes, name: str = "replica") -> str:
        both = _both(primary, mirror)
        if both is None:
            return super().difference(primary, mirror, name)
        _head, ours, theirs = both
        only_p = Counter(ours) - Counter(theirs)
        only_m = Counter(theirs) - Counter(ours)
        parts = [
            f"differs (compared in any order): {len(ours)} elements from the primary, "
            f"{len(theirs)} from {name}"
        ]
        if only_p:
            parts.append(f"only the primary's: {', '.join(_show(x) for x in list(only_p)[:3])}")
        if only_m:
            parts.append(f"only {name}'s: {', '.join(_show(x) for x in list(only_m)[:3])}")
        if not only_p and not only_m:
            parts.append("the same elements, paired differently")
        return "; ".join(parts)


def _same_multiset(a: list[bytes], b: list[bytes], pairs: bool) -> bool:
    if len(a) != len(b):
        return False
    if pairs:
        pa, pb = _pairs(a), _pairs(b)
        if pa is None or pb is None:
            return False
        return sorted(pa) == sorted(pb)
    return sorted(a) == sorted(b)


#: The encoding of the cursor that starts and ends a SCAN iteration.
_CURSOR_ZERO: Final = b"$1\r\n0\r\n"


class Scan(Expect):
    """A ``SCAN``-family reply: ``[cursor, [elements]]``.

    Cursors are each server's own (the primary's cursor means little to a replica),
    so they are never compared. The elements are compared, in any order, only
    where both servers returned the whole collection in one batch (asked from
    cursor 0, answered with cursor 0); other batches are not comparable.
    """

    def __init__(self, label: str, first: bool, pairs: bool) -> None:
        super().__init__(label, "scan")
        self.first = first
        self.pairs = pairs

    def equivalent(self, primary: bytes, mirror: bytes) -> bool:
        if primary == mirror:
            return True
        p = elements(primary)
        m = elements(mirror)
        if p is None or m is None or len(p[1]) != 2 or len(m[1]) != 2:
            return False  # an error, say: compared as it is
        if not (self.first and p[1][0] == _CURSOR_ZERO and m[1][0] == _CURSOR_ZERO):
            return True
        pe = elements(p[1][1])
        me = elements(m[1][1])
        if pe is None or me is None:
            return False
        return _same_multiset(pe[1], me[1], self.pairs)

    def difference(self, primary: bytes, mirror: bytes, name: str = "replica") -> str:
        p = elements(primary)
        m = elements(mirror)
        if p is None or m is None or len(p[1]) != 2 or len(m[1]) != 2:
            return super().difference(primary, mirror, name)
        return Unordered(self.label, self.pairs).difference(p[1][1], m[1][1], name)


class Transaction(Expect):
    """``EXEC``: an array with the reply of each queued command, each compared by its rule."""

    def __init__(self, parts: list[Expect]) -> None:
        exact = all(part.exact for part in parts)
        super().__init__("EXEC", "exact" if exact else "transaction")
        self.parts = parts

    def _replies(self, primary: bytes, mirror: bytes) -> tuple[list[bytes], list[bytes]] | None:
        """Each side's reply per queued command, where both are arrays of that many."""
        both = _both(primary, mirror)
        if both is None or not len(both[1]) == len(both[2]) == len(self.parts):
            return None
        return both[1], both[2]

    def equivalent(self, primary: bytes, mirror: bytes) -> bool:
        if primary == mirror:
            return True
        both = self._replies(primary, mirror)
        return both is not None and all(
            rule.equivalent(a, b) for rule, a, b in zip(self.parts, *both, strict=True)
        )

    def difference(self, primary: bytes, mirror: bytes, name: str = "replica") -> str:
        both = self._replies(primary, mirror)
        if both is None:
            return super().difference(primary, mirror, name)
        for i, (rule, a, b) in enumerate(zip(self.parts, *both, strict=True)):
            if not rule.equivalent(a, b):
                what = rule.difference(a, b, name)
                return f"differs in the reply to queued command {i + 1} ({rule.label}): {what}"
        return super().difference(primary, mirror, name)  # pragma: no cover


# ----------------------------------------------------------------------- the rules

#: What the Redis 7 tips miss or say otherwise, and every rule for a server that
#: does not answer COMMAND (Redis 6, or a fork built without the tips). "NAME *":
#: every subcommand of NAME. HELLO and CLIENT ID answer a per-server connection
#: counter; CONFIG GET answers each server's own ports, paths and so on.
DEFAULT_IGNORE: Final = (
    "INFO", "TIME", "HELLO", "CLIENT *", "COMMAND", "COMMAND *", "MEMORY *", "LATENCY *",
    "SLOWLOG *", "CONFIG GET", "ROLE", "LASTSAVE", "DEBUG *", "OBJECT *", "RANDOMKEY",
    "SRANDMEMBER", "HRANDFIELD", "ZRANDMEMBER", "TTL", "PTTL", "DUMP",
)  # fmt: skip
#: Replies in each server's hash order (sets past 128 members, hashes past 512 fields).
DEFAULT_UNORDERED: Final = (
    "SMEMBERS", "SINTER", "SUNION", "SDIFF", "KEYS", "HKEYS", "HVALS", "HGETALL",
)  # fmt: skip
#: Field/value pairs, compared as pairs.
_PAIRED: Final = frozenset({"hgetall"})
#: SCAN-family commands and where their cursor is (argument index); HSCAN and ZSCAN
#: return field/value (member/score) pairs.
_SCANS: Final = {"scan": 1, "sscan": 2, "hscan": 2, "zscan": 2}
_SCAN_PAIRS: Final = frozenset({"hscan", "zscan"})

#: Commands after which this framer no longer knows which reply answers which
#: request: pub/sub (messages arrive on their own; compared as bytes from there on).
_UNMODELLED: Final = frozenset(
    {
        b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe",
        b"sunsubscribe", b"replconf",
    }
)  # fmt: skip
#: Commands after which each server streams output of its own (MONITOR: timestamps
#: and client addresses; SYNC, PSYNC: a replication stream): not compared any more.
_OWN_STREAM: Final = frozenset({b"monitor", b"sync", b"psync"})
#: Commands that change how later replies pair with requests (_request handles them).
_STATEFUL: Final = frozenset(
    {b"multi", b"exec", b"discard", b"watch", b"quit", b"reset", b"client"}
    | _UNMODELLED
    | _OWN_STREAM
)


def _key(name: str) -> str:
    """``"CONFIG GET"`` -> ``"config|get"``, ``"CLIENT *"`` -> ``"client|*"`` (Redis's own
    spelling of subcommands, as COMMAND reports them)."""
    return "|".join(name.lower().split())


def _label(key: str) -> str:
    return key.replace("|", " ").upper()


class RespRules:
    """Which :class:`Expect` each command's reply gets, by command (and subcommand).

    Built from, in order, the server's own tips (``COMMAND``), the built-in
    defaults above, and the config's ``[protocol.resp]`` lists, each later one
    winning. A command named nowhere is compared exactly.
    """

    def __init__(
        self,
        tips: Mapping[str, str] | None = None,
        *,
        ignore: Iterable[str] = (),
        unordered: Iterable[str] = (),
        exact: Iterable[str] = (),
        source: str = "built-in",
    ) -> None:
        kinds: dict[str, str] = dict(tips or {})
        ignore, unordered, exact = tuple(ignore), tuple(unordered), tuple(exact)
        built_in = {
            **dict.fromkeys(DEFAULT_IGNORE, "ignore"),
            **dict.fromkeys(DEFAULT_UNORDERED, "unordered"),
        }
        configured = {
            **dict.fromkeys(ignore, "ignore"),
            **dict.fromkeys(unordered, "unordered"),
            **dict.fromkeys(exact, "exact"),
        }
        for layer in (built_in, configured):
            # A layer's "NAME *" replaces what the layers before said of NAME's
            # subcommands (COMMAND DOCS: unordered by the tips, ignored by default).
            for name, kind in layer.items():
                key = _key(name)
                if key.endswith("|*"):
                    prefix = key[:-1]
                    for old in [k for k in kinds if k.startswith(prefix)]:
                        del kinds[old]
                    kinds[key] = kind
            for name, kind in layer.items():
                if not _key(name).endswith("|*"):
                    kinds[_key(name)] = kind
        #: Where the server's part came from: ``built-in`` or ``server COMMAND``.
        self.source = source
        self.kinds = kinds
        self._table: dict[bytes, Expect] = {}
        #: Names of recent plain requests and their expectations, by slot (see
        #: RespFraming._plain): one table for every session, which stays in the cache
        #: where one per session would be read from memory at each session's turn.
        self.slot_names: list[bytes] = [b""] * _NAME_SLOTS
        self.slot_expects: list[Expect] = [_UNKNOWN] * _NAME_SLOTS
        self._containers: set[bytes] = set()
        for key, kind in kinds.items():
            command, _, sub = key.partition("|")
            if sub:
                self._containers.add(command.encode())
            self._table[key.encode()] = self._make(key, kind)
        self._exact: dict[bytes, Expect] = {}
        self._plain: dict[bytes, Expect] = {}  # (by name as sent: see plain())
        # The SCAN family, unless the config names one: (later batch, first batch).
        named = {_key(name) for name in (*ignore, *unordered, *exact)}
        self._scan_rules: dict[bytes, tuple[Expect, Expect]] = {
            name.encode(): (
                Scan(name.upper(), False, name in _SCAN_PAIRS),
                Scan(name.upper(), True, name in _SCAN_PAIRS),
            )
            for name in _SCANS
            if name not in named
        }
        self.queued = Expect("(queued)")

    @staticmethod
    def _make(key: str, kind: str) -> Expect:
        label = _label(key)
        if kind == "unordered":
            return Unordered(label, pairs=key in _PAIRED)
        return Expect(label, kind)

    def lookup(self, args: list[bytes]) -> Expect:
        """The expectation of a request whose first arguments are ``args``."""
        command = args[0].lower()
        if command in self._scan_rules:
            at = _SCANS[command.decode()]
            return self._scan_rules[command][len(args) > at and args[at] == b"0"]
        if command in self._containers and len(args) > 1:
            key = command + b"|" + args[1].lower()
            found = self._table.get(key)
            if found is not None:
                return found
            wild = self._table.get(command + b"|*")
            if wild is not None:
                return self._named(key, wild.kind)
            return self._named(key, "exact")
        found = self._table.get(command)
        if found is not None:
            return found
        return self._named(command, "exact")

    def _named(self, key: bytes, kind: str) -> Expect:
        """The expectation for a command the table has no entry of its own for."""
        found = self._exact.get(key)
        if found is None:
            if len(self._exact) >= _MAX_NAMES:
                return _UNKNOWN if kind == "exact" else Expect("(command)", kind)
            found = self._exact[key] = self._make(key.decode(errors="replace"), kind)
        return found

    def plain(self, name: bytes) -> Expect | None:
        """The expectation of a request that only ``name`` decides (as sent, any case),
        or None for the commands whose other arguments or state matter."""
        found = self._plain.get(name)
        if found is None:
            command = name.lower()
            if (
                command in _STATEFUL
                or command in self._containers
                or command in self._scan_rules
                or len(self._plain) >= _MAX_NAMES
            ):
                return None
            found = self._plain[name] = self.lookup([name])
        return found

    def wants(self, command: bytes) -> int:
        """How many leading arguments of a request naming ``command`` the rules read."""
        if command in _SCAN_NAMES:
            return _SCANS[command.decode()] + 1
        if command == b"client":
            return 3  # CLIENT REPLY ON|OFF|SKIP
        if command in self._containers:
            return 2
        return 1

    def describe(self) -> dict[str, list[str]]:
        """The rules that are not ``exact``, by kind (for the status page and ``check``)."""
        out: dict[str, list[str]] = {}
        for key, kind in sorted(self.kinds.items()):
            if kind != "exact":
                out.setdefault(kind, []).append(_label(key))
        for name in self._scan_rules:
            out.setdefault("scan", []).append(name.decode().upper())
        return out


_SCAN_NAMES: Final = frozenset(name.encode() for name in _SCANS)
#: Distinct command names a session's rules remember (a client sending random
#: command names cannot grow them without bound).
_MAX_NAMES: Final = 4096
_UNKNOWN: Final = Expect("(command)")


def tips_from_command(reply: bytes) -> dict[str, str]:
    """The rule each command's tips imply, read from a whole ``COMMAND`` reply.

    ``nondeterministic_output`` makes a read ``ignore`` and leaves a write ``exact``
    (``SPOP``: replicas end with different data, a real divergence);
    ``nondeterministic_output_order`` makes it ``unordered``. Raises ValueError
    when the reply is not a command table.
    """
    top = elements(reply)
    if top is None:
        raise ValueError("COMMAND did not answer an array")
    kinds: dict[str, str] = {}
    for entry in top[1]:
        _command_tips(entry, kinds)
    return kinds


def _command_tips(entry: bytes, kinds: dict[str, str]) -> None:
    fields = elements(entry)
    if fields is None or len(fields[1]) < 8:
        raise ValueError("a COMMAND entry is not an array of 8 or more fields")
    items = fields[1]
    name = _string(items[0]).lower()
    flags = {_string(f) for f in (elements(items[2]) or (b"", []))[1]}
    tips = {_string(t) for t in (elements(items[7]) or (b"", []))[1]}
    if "nondeterministic_output" in tips:
        kinds[name] = "exact" if "write" in flags else "ignore"
    elif "nondeterministic_output_order" in tips:
        kinds[name] = "unordered"
    if len(items) > 9:
        for sub in (elements(items[9]) or (b"", []))[1]:
            _command_tips(sub, kinds)


def _string(item: bytes) -> str:
    """A bulk, simple or verbatim string's text."""
    kind = item[:1]
    if kind in (b"+", b":"):
        return item[1:-2].decode(errors="replace")
    if kind in (b"$", b"="):
        end = item.find(b"\r\n")
        text = item[end + 2 : -2]
        if kind == b"=":
            text = text[4:]  # "txt:" or "mkd:"
        return text.decode(errors="replace")
    raise ValueError(f"expected a string, got {item[:20]!r}")


# ------------------------------------------------------------------ the framing

_ON: Final = 0
_OFF: Final = 1  # CLIENT REPLY OFF: no replies until CLIENT REPLY ON
_SKIP: Final = 2  # CLIENT REPLY SKIP: no reply to the next command


#: How many names of plain requests the rules keep at hand (a power of two: see
#: RespFraming._plain).
_NAME_SLOTS: Final = 32


def _number_line(data: bytes, i: i64, most: i64) -> tuple[i64, i64]:
    """The decimal number at ``data[i]`` that ends its line (CRLF): its value and
    where the line ends; ``(-1, -1)`` if it has no digit, passes ``most``, or its
    CRLF is not all there. (Digit by digit: compiled, no slice and no int().)"""
    n: i64 = len(data)
    j = i
    value: i64 = 0
    while i < n:
        c: i64 = data[i]
        if c < 0x30 or c > 0x39:
            break
        value = value * 10 + c - 0x30
        if value > most:
            return -1, -1
        i += 1
    if i == j or i + 1 >= n or data[i] != 13 or data[i + 1] != 10:
        return -1, -1
    return value, i + 2


def _small_line(data: bytes, i: i64, most: i64) -> tuple[i64, i64]:
    """:func:`_number_line`, a number of one or two digits (an argument count, a
    command name's or a key's length) read without a loop."""
    n: i64 = len(data)
    if i + 2 < n and data[i + 1] == 13 and data[i + 2] == 10:
        c: i64 = data[i]
        c -= 0x30
        if 0 <= c <= 9 and c <= most:  # (statements: a conditional of tuples is boxed)
            return c, i + 3
        return -1, -1
    if i + 3 < n and data[i + 2] == 13 and data[i + 3] == 10:
        tens: i64 = data[i]
        ones: i64 = data[i + 1]
        tens -= 0x30
        ones -= 0x30
        if 0 <= tens <= 9 and 0 <= ones <= 9:
            value = tens * 10 + ones
            if value <= most:
                return value, i + 4
        return -1, -1
    return _number_line(data, i, most)


def _skip_bulk(data: bytes, i: i64) -> i64:
    """Where the bulk string at ``data[i]`` ends, or -1 if it is cut short or odd."""
    if i >= len(data) or data[i] != 0x24:  # $
        return -1
    length, i = _small_line(data, i + 1, MAX_BULK)
    if i < 0:
        return -1
    end = i + length + 2
    if end > len(data):
        return -1
    return end


class RespFraming(Framing):
    """Frames one session's RESP traffic."""

    def __init__(self, rules: RespRules) -> None:
        super().__init__()
        self.rules = rules
        self._reply = RespParser()
        # The request being read.
        self._line = b""  # a header or inline line the last chunk cut
        self._argc = 0  # arguments of the current multibulk still to read
        self._skip = 0  # bytes of the current argument (and its CRLF) still to pass
        self._keep = 0  # of those, how many are kept (the argument is one the rules read)
        self._part = bytearray()  # the kept argument so far
        self._args: list[bytes] = []  # the arguments kept
        self._want = 1  # how many leading arguments to keep
        # Session state that changes how replies pair with requests.
        self._mode = _ON
        self._multi: list[Expect] | None = None  # MULTI: each queued command's expectation

    # ---------------------------------------------------------------- requests

    def request(self, data: bytes) -> None:
        if self.deaf:
            return
        pos: i64 = 0
        n: i64 = len(data)
        while pos < n:
            if not (self._argc or self._skip or len(self._line)):  # (len: no call by name)
                # At a request's start: a whole multibulk request is read in one go,
                # without keeping any state (most of them are, in one chunk).
                end = self._whole(data, pos)
                if end > 0:
                    pos = end
                    continue
            skip = self._skip
            if skip:
                take = min(skip, n - pos)
                keep = self._keep
                if keep:
                    k = min(keep, take)
                    self._part += data[pos : pos + k]
                    self._keep = keep - k
                pos += take
                self._skip = skip - take
                if self._skip == 0:
                    self._argument_done()
                continue
            # Multibulk lines end in CRLF; an inline request ends at LF (Redis drops a CR).
            multibulk = self._argc > 0 or (self._line[:1] or data[pos : pos + 1]) == b"*"
            sep = b"\r\n" if multibulk else b"\n"
            if self._line:
                joined = self._line + data[pos : pos + MAX_LINE + 2]
                end = joined.find(sep)
                if end < 0:
                    self._line = joined
                    if len(joined) > MAX_LINE:
                        self.stop()  # the server answers an error and closes
                    return
                line = joined[:end]
                pos += end + len(sep) - len(self._line)
                self._line = b""
            else:
                end = data.find(sep, pos)
                if end < 0:
                    self._line = data[pos:]
                    if n - pos > MAX_LINE:
                        self.stop()
                    return
                line = data[pos:end]
                pos = end + len(sep)
            if not self._header(line, multibulk):
                self.stop()
                return

    def _whole(self, data: bytes, pos: i64) -> i64:
        """Read the multibulk request at ``data[pos]`` if all of it is there.

        Returns where it ends, or -1 (nothing done) when it is cut short, not a
        multibulk, or anything out of the ordinary: the resumable path reads it then.
        """
        n: i64 = len(data)
        if data[pos] != 0x2A:  # *
            return -1
        count, i = _small_line(data, pos + 1, MAX_ARGS)
        if count <= 0 or i + 4 > n or data[i] != 0x24:  # $
            return -1
        # The command's name.
        length, i = _small_line(data, i + 1, MAX_BULK)
        end = i + length
        if i < 0 or end + 2 > n:
            return -1
        expect = self._plain(data, i, end)
        if expect is not None and self._multi is None and self._mode == _ON:
            # An ordinary command (most are): only its name matters.
            i = end + 2
            left = count - 1
            while left > 0:
                i = _skip_bulk(data, i)
                if i < 0:
                    return -1
                left -= 1
            self.queue(expect)
            return i
        arg = data[i:end]
        want = self.rules.wants(arg.lower())
        args = [arg]
        i = end + 2
        k = 1
        while k < count:
            if i >= n or data[i] != 0x24:  # $
                return -1
            length, i = _number_line(data, i + 1, MAX_BULK)
            if i < 0:
                return -1
            end = i + length
            if end + 2 > n:
                return -1
            if k < want:
                args.append(data[i:end])
            i = end + 2
            k += 1
        self._request(args)
        return i

    def _plain(self, data: bytes, i: i64, end: i64) -> Expect | None:
        """``rules.plain(data[i:end])``. The names of recent plain requests are kept
        in a few slots (by their length and first and last bytes) and compared in
        place: most requests repeat a name, and are then read without a copy."""
        rules = self.rules
        length = end - i
        slot: i64 = 0
        if length:
            first: i64 = data[i]
            last: i64 = data[end - 1]
            slot = (first ^ last ^ length) & (_NAME_SLOTS - 1)
            name = rules.slot_names[slot]
            if len(name) == length:
                j: i64 = 0
                while j < length and data[i + j] == name[j]:
                    j += 1
                if j == length:
                    return rules.slot_expects[slot]
        name = data[i:end]
        expect = rules.plain(name)
        if expect is not None and length:
            rules.slot_names[slot] = name
            rules.slot_expects[slot] = expect
        return expect

    def _argument_done(self) -> None:
        args = self._args
        if len(args) < self._want:  # (then every byte of it was kept)
            args.append(bytes(self._part))
            self._part.clear()
            if len(args) == 1:
                self._want = self.rules.wants(args[0].lower())
        self._argc -= 1
        if self._argc == 0:
            self._request(args)
            self._args = []
            self._want = 1

    def _header(self, line: bytes, multibulk: bool) -> bool:
        """Handle one request line; False if it is not RESP."""
        if self._argc:  # $LENGTH of the next argument
            if line[:1] != b"$":
                return False
            try:
                length = int(line[1:])
            except ValueError:
                return False
            if not 0 <= length <= MAX_BULK:
                return False
            self._skip = length + 2
            self._keep = length if len(self._args) < self._want else 0
            return True
        if multibulk:
            try:
                count = int(line[1:])
            except ValueError:
                return False
            if count > MAX_ARGS:
                return False
            if count > 0:  # (*0 and *-1 are no request, and get no reply)
                self._argc = count
            return True
        words = line.rstrip(b"\r").split()
        if words:  # (an empty line is no request, and gets no reply)
            self._request(words[:3])
        return True

    def _request(self, args: list[bytes]) -> None:
        """A whole request: queue the expectation of its reply, if it gets one.

        (How Redis 7 answers, in processCommand and resetClient: in MULTI, every
        command but EXEC, DISCARD, MULTI, WATCH, QUIT and RESET is queued and
        answers +QUEUED; CLIENT REPLY OFF silences everything until CLIENT REPLY
        ON, SKIP silences itself and the next command; RESET answers even then.)
        """
        command = args[0].lower()
        rules = self.rules
        if command in _OWN_STREAM:
            self.stop(compare=False)
            return
        if command in _UNMODELLED or (
            command == b"client" and len(args) > 1 and args[1].lower() == b"reply"
            and (self._multi is not None or len(args) < 3)
        ):  # fmt: skip
            self.stop()
            return
        if command == b"reset":
            self._multi = None
            self._mode = _ON
            self.queue(rules.lookup(args))
            return
        multi = self._multi
        if multi is not None:
            if command == b"exec":
                self._multi = None
                self._reply_to(Transaction(multi))
            elif command == b"discard":
                self._multi = None
                self._reply_to(rules.lookup(args))
            elif command in (b"multi", b"watch", b"quit"):
                self._reply_to(rules.lookup(args))  # run at once, not queued
            else:
                multi.append(rules.lookup(args))
                self._reply_to(rules.queued)
            return
        if command == b"client" and len(args) > 2 and args[1].lower() == b"reply":
            mode = args[2].lower()
            if mode == b"on":
                self._mode = _ON
                self.queue(rules.lookup(args))
                return
            if mode == b"off":
                self._mode = _OFF
                return
            if mode == b"skip":
                if self._mode == _ON:
                    self._mode = _SKIP
                return
        elif command == b"multi":
            self._multi = []
        self._reply_to(rules.lookup(args))

    def _reply_to(self, expect: Expect) -> None:
        mode = self._mode
        if mode == _ON:
            self.queue(expect)
        elif mode == _SKIP:
            self._mode = _ON  # this command's reply is skipped, the next one's is not

    # ----------------------------------------------------------------- replies

    def begin(self, data: bytes, pos: int) -> Expect | None:
        if self.lost:
            return None
        if data[pos] == 0x3E:  # > a RESP3 push: it answers no request
            self.lose()
            return None
        expect = self.expect_next()
        if expect is not None and not self._reply.fresh:
            self._reply.reset()
        return expect

    def whole_reply(self, expect: Expect, data: bytes, pos: int) -> int:
        return _simple_end(data, pos)  # (-1 for a RESP3 push too)

    def feed(self, data: bytes, pos: int) -> int:
        reply = self._reply
        if reply.fresh:
            # Most replies are one line or one bulk string, whole in the chunk.
            end = _simple_end(data, pos)
            if end > 0:
                return end
        return reply.feed(data, pos)

    def parser(self, expect: Expect) -> ReplyParser:
        return RespParser()

    def unbegin(self, expects: list[Expect]) -> None:
        super().unbegin(expects)
        self._reply.reset()


def _resp_opening(client: bytes) -> bool:
    """A multibulk request: ``*N\\r\\n$``. (An inline command could as well be memcached.)"""
    end = client.find(b"\r\n")
    return (
        client[:1] == b"*"
        and end > 1
        and client[1:end].isdigit()
        and client[end + 2 : end + 3] in (b"$", b"")
    )


recognise("resp", _resp_opening)
