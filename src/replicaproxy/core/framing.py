"""Messages instead of bytes: what a protocol's framer gives the session.

With ``protocol = "bytes"`` a session compares a replica's output with the
primary's byte for byte. A framed protocol splits the client's stream into
requests and each upstream's output into replies, pairs reply *k* with request
*k*, and compares a replica's reply *k* with the primary's under a rule that the
request chose (an ``INFO`` reply may differ, an ``SMEMBERS`` reply is a set).

A protocol is one small module in ``core/`` with three things, all without I/O:

* a :class:`Framing` (one per session): :meth:`Framing.request` reads the
  client's bytes and queues one :class:`Expect` per reply they call for;
  :meth:`Framing.begin` and :meth:`Framing.feed` frame the primary's output and
  pair each reply with the next expectation;
* a :class:`ReplyParser`, which finds where one reply ends (the session frames a
  replica's reply only where it must, see ``core/session.py``);
* its :class:`Expect` kinds, which say how two replies to the same request are
  compared.

Pairing is never guessed. Where a framer meets a state it does not model (a
reply that pairs with no request, a request it cannot parse, a protocol
switch), it says so (:attr:`Framing.lost`) and the session compares bytes from
there on, as ``protocol = "bytes"`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

#: :meth:`ReplyParser.feed`: the reply goes on past the data given.
MORE: Final = -1
#: :meth:`ReplyParser.feed`: the bytes are not a reply of this protocol.
GARBAGE: Final = -2

#: Replies asked for but not yet seen, per session. Each is one reference to a
#: shared :class:`Expect` (8 bytes); past this a client that pipelines without
#: reading makes its session fall back to comparing bytes instead of growing.
MAX_PENDING: Final = 100_000
#: Taken expectations are dropped from the front of the queue at least this many at a
#: time, and once they are half of it (few: a short list stays in the cache, which
#: measured faster with 50 pipelining sessions than dropping them less often). A queue
#: no longer than this whose requests were all answered is used again from its start.
_COMPACT: Final = 64


class Expect:
    """What one request expects of its reply, and how two such replies are compared.

    Instances are shared by every request of a kind (one per command and rule),
    so framing a request allocates nothing. ``exact`` replies are compared byte
    for byte, which is what the session does without asking; the others are
    collected whole and handed to :meth:`equivalent`.
    """

    def __init__(self, label: str, kind: str = "exact") -> None:
        #: Names the request in log lines: ``GET``, ``CLIENT ID``, ``GET /index.html``.
        self.label = label
        #: ``exact``, ``ignore`` or a protocol's own (``unordered``, ``scan``, ...).
        self.kind = kind
        self.exact = kind == "exact"
        #: The reply may differ in any way: only where it ends matters.
        self.ignored = kind == "ignore"
        #: The reply holds something the proxy keeps per backend (see :meth:`learn`).
        self.learns = False
        #: Two servers' replies are usually the same bytes (an HTTP response whose
        #: Date is the same second): the session compares them in place, byte for
        #: byte, and collects a replica's version whole only from a difference on.
        #: (Whole from the start: replies that usually differ, and those it learns from.)
        self.in_place = False

    def name(self) -> str:
        """The request's name in log lines and metrics (:attr:`label`, or one made only
        when asked for: a PostgreSQL query's text)."""
        return self.label

    def equivalent(self, primary: bytes, mirror: bytes) -> bool:
        """Whether two whole replies to this request count as the same answer."""
        return self.ignored or primary == mirror

    def difference(self, primary: bytes, mirror: bytes, name: str = "replica") -> str:
        """What differs, for the divergence line (called only when not equivalent);
        ``name`` is the mirror's."""
        return describe_bytes(primary, mirror, name)

    def learn(self, reply: bytes) -> bytes | None:
        """What a backend's whole reply holds that the proxy keeps per backend (where
        :attr:`learns`): PostgreSQL's BackendKeyData, to route cancels."""
        return None

    def __repr__(self) -> str:
        return f"Expect({self.label!r}, {self.kind!r})"


#: A marker in the queue of expectations: the framer lost track of the requests here.
LOST: Final = Expect("(unframed)", "lost")
#: A marker: from here on each server's output is its own by nature (a stream of
#: timestamps and addresses, a replication stream): it is no longer compared.
UNCOMPARED: Final = Expect("(each server's own)", "lost")


class ReplyParser:
    """Finds where one reply ends, however its bytes are cut into chunks."""

    def feed(self, data: bytes, pos: int) -> int:
        """Read ``data[pos:]`` as the continuation of the reply.

        Returns the index in ``data`` just past the reply's end, :data:`MORE`
        when the reply goes on past ``data`` (the parser keeps its place), or
        :data:`GARBAGE` when the bytes cannot be a reply.
        """
        raise NotImplementedError

    def finish(self) -> bool:
        """The upstream closed its side: whether the reply ends there (a body
        delimited by the close), so that it is whole."""
        return False


class Framing:
    """One session's view of its protocol: requests in, replies paired with them."""

    def __init__(self) -> None:
        # The expectation of each request whose reply has not begun, oldest first:
        # _due[_taken:_n] (a list and two indexes: native list operations when
        # compiled, where a deque's are calls by name). Past _n the list holds slots
        # used before (at most _COMPACT), written over as requests come: emptied and
        # filled again, a list is given back to the allocator and asked for anew.
        self._due: list[Expect] = []
        self._taken = 0
        self._n = 0
        #: Replies are no longer paired: bytes are compared from there on.
        self.lost = False
        #: Requests are no longer read (a LOST marker ends the queue).
        self.deaf = False
        #: Lost at an UNCOMPARED marker: what follows is not compared at all.
        self.uncompared = False
        #: The server may say last words between replies (see :meth:`last_words`).
        self.says_last_words = False

    def request(self, data: bytes) -> None:
        """The client sent ``data`` (every byte, in order, once)."""
        raise NotImplementedError

    def begin(self, data: bytes, pos: int) -> Expect | None:
        """A reply of the primary's begins at ``data[pos]``: the request it answers.

        None: it answers no request the framer knows of (the session falls back to
        bytes). The primary's reply is then read with :meth:`feed`.
        """
        raise NotImplementedError

    def feed(self, data: bytes, pos: int) -> int:
        """Go on reading the primary's current reply: as :meth:`ReplyParser.feed`."""
        raise NotImplementedError

    def run(self, data: bytes, pos: int, sizes: list[int], expects: list[Expect]) -> int:
        """Frame replies of the primary's from ``data[pos]`` (between replies) as far as
        they are whole and exact and need nothing more of the session (no last words,
        nothing to learn): appends each one's size and expectation, and returns where
        the last one ends (``pos``: none was). :meth:`begin` and :meth:`feed` frame the
        rest; this is the same, in one call for many replies, for the replies
        :meth:`whole_reply` finds."""
        if self.lost:
            return pos
        due = self._due
        taken = self._taken
        m = self._n
        n = len(data)
        while taken < m and pos < n:
            expect = due[taken]
            if not expect.exact or expect.learns:  # (a LOST marker is not exact either)
                break
            end = self.whole_reply(expect, data, pos)
            if end < 0:
                break
            # (a size, not where it starts: most are below 257, which Python keeps one
            # object for, where an offset in the stream would be a new int per reply)
            sizes.append(end - pos)
            expects.append(expect)
            taken += 1
            pos = end
        self._took(taken)
        return pos

    def whole_reply(self, expect: Expect, data: bytes, pos: int) -> int:
        """Where the reply to ``expect`` at ``data[pos]`` ends, if all of it is there and
        it is of a kind found without a parser's state; -1 otherwise (:meth:`begin` and
        :meth:`feed` read it then). A framer need not find any (:meth:`run` frames
        none then)."""
        return -1

    def parser(self, expect: Expect) -> ReplyParser:
        """A parser for a replica's reply to a request that expects ``expect``."""
        raise NotImplementedError

    def finish(self) -> bool:
        """The primary closed its side inside a reply: whether the reply ends there."""
        return False

    def last_words(self, data: bytes, pos: int) -> bool:
        """Whether the primary's output at ``data[pos]``, between replies, is its last
        words (only asked where :attr:`says_last_words`)."""
        return False

    def ends(self) -> int:
        """Where, in the primary's reply that just ended, its last words began: a
        message after which the server closes the connection (PostgreSQL's FATAL),
        as bytes from the reply's start; -1 when the reply ended as usual."""
        return -1

    @property
    def pending(self) -> list[Expect]:
        """The expectation of each request whose reply has not begun, oldest first."""
        return self._due[self._taken : self._n]

    def has_pending(self) -> bool:
        """Whether some request's reply has not begun."""
        return self._taken < self._n

    def unbegin(self, expects: list[Expect]) -> None:
        """Replies to these requests (oldest first) are to be framed again, from a new
        primary: they are pending once more, ahead of the rest."""
        self._due = expects + self._due[self._taken : self._n]
        self._taken = 0
        self._n = len(self._due)

    def expect_next(self) -> Expect | None:
        """The oldest pending expectation, taken; None when there is none or framing
        was lost there."""
        due = self._due
        taken = self._taken
        if taken >= self._n:
            return None
        expect = due[taken]
        self._took(taken + 1)
        if expect is LOST or expect is UNCOMPARED:
            self.lose()
            self.uncompared = expect is UNCOMPARED
            return None
        return expect

    def _took(self, taken: int) -> None:
        """The first ``taken`` of ``_due`` are taken: drop them now and then."""
        n = self._n
        if taken == n and n <= _COMPACT:
            self._n = taken = 0  # (the slots are written over from the start)
        elif taken >= _COMPACT and 2 * taken >= n:
            del self._due[:taken]
            self._n = n - taken
            taken = 0
        self._taken = taken

    def queue(self, expect: Expect) -> None:
        """One more reply is due, after those already pending."""
        if self._n - self._taken >= MAX_PENDING:
            self.stop()
            return
        self._put(expect)

    def _put(self, expect: Expect) -> None:
        """Add ``expect`` at the queue's end."""
        due = self._due
        n = self._n
        if n < len(due):
            due[n] = expect
        else:
            due.append(expect)
        self._n = n + 1

    def stop(self, *, compare: bool = True) -> None:
        """Stop reading requests here: the replies to those before still pair, and
        the first reply after them makes the framing :attr:`lost`: compared as bytes
        from there on, or (``compare=False``) not at all."""
        if not self.deaf:
            self.deaf = True
            self._put(LOST if compare else UNCOMPARED)

    def lose(self) -> None:
        """Stop framing now: whatever follows is compared as bytes."""
        self.lost = self.deaf = True
        self._due.clear()
        self._taken = self._n = 0


#: The protocols a bytes session's divergence line may suggest, by what a client's
#: first bytes look like (set by each protocol's module as it is added).
_OPENINGS: list[tuple[str, Callable[[bytes], bool]]] = []


def recognise(name: str, opening: Callable[[bytes], bool]) -> None:
    """Register how the start of a client's stream in protocol ``name`` looks."""
    _OPENINGS.append((name, opening))


def guess_protocol(client_head: bytes) -> str | None:
    """The protocol setting whose framing a client's first bytes suggest, if any."""
    for name, opening in _OPENINGS:
        if opening(client_head):
            return name
    return None


# ------------------------------------------------------------------ log helpers

#: How many bytes of each side a divergence line shows.
EXCERPT_BYTES: Final = 24


def excerpt(data: bytes | bytearray | memoryview, at: int = 0) -> str:
    """``data[at:]`` shown readably: printable ASCII as is, the rest as ``\\xNN``.

    At most :data:`EXCERPT_BYTES` bytes, with ``...`` when there is more.
    """
    chunk = bytes(data[at : at + EXCERPT_BYTES])
    text = "".join(
        chr(b)
        if 32 <= b < 127 and b != 0x5C
        else ("\\r" if b == 13 else "\\n" if b == 10 else f"\\x{b:02x}")
        for b in chunk
    )
    more = "..." if len(data) - at > EXCERPT_BYTES else ""
    return f'"{text}"{more}'


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """The first index where ``a`` and ``b`` differ (the shorter's length if one is a prefix)."""
    n = min(len(a), len(b))
    lo, hi = 0, n
    if a[:n] == b[:n]:
        return n
    # Halve the range that holds the first difference: a few slice compares in C.
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return hi


def side_by_side(
    primary: bytes | bytearray, mirror: bytes | bytearray, name: str, at: int = 0
) -> str:
    """``primary "...", NAME "..."``: both sides from ``at``."""
    return f"primary {excerpt(primary, at)}, {name} {excerpt(mirror, at)}"


def describe_bytes(primary: bytes | bytearray, mirror: bytes | bytearray, name: str) -> str:
    """``differ at byte N: primary "...", NAME "..."`` for two byte strings that differ."""
    i = first_difference(primary, mirror)
    return f"differs at its byte {i}: {side_by_side(primary, mirror, name, i)}"
