"""The vocabulary between the I/O driver and the session core.

Events go into :class:`replicaproxy.core.session.Session`; actions come out and
the driver carries them out. Neither side knows how the other works: the core
never sees a socket, and the driver makes no decision of its own.

Events and actions are plain slotted dataclasses, treated as immutable (not
declared frozen: a frozen dataclass is about twice as slow to build, and the
data path builds one or two per chunk). The module is compiled with the session
and its driver (setup.py), and a short session builds twenty or more of them.
So each class spells out its ``__init__``: the one a dataclass generates stays
Python code when compiled, run for every object (about 0.3 us); an ``__init__``
of the class's own is compiled with it, and the dataclass adds only ``__eq__``
and ``__repr__``. (Keep the two in step: the same fields, in the same order.)

Every endpoint of a session is named by a string: the client is ``CLIENT``, an
upstream is the backend's name (names never contain ``<``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

CLIENT = "<client>"


class Timer(enum.Enum):
    """The timers a session can ask for."""

    #: After the primary's EOF or the session's end: how long replicas may finish.
    CLOSE_GRACE = "close_grace"
    #: After close: how long upstreams may take to accept their last input bytes.
    LINGER = "linger"
    #: After the primary's EOF: how long replicas may take to confirm it.
    PRIMARY_EOF = "primary_eof"
    #: Sync mode: how long a replica may hold back a reply byte the primary sent.
    REPLICA_TIMEOUT = "replica_timeout"
    #: After a replica ended its side while the primary did not: how long the
    #: primary may take to end at the same point (the server ended the session).
    REPLICA_EOF = "replica_eof"


# ---------------------------------------------------------------------- events


@dataclass(slots=True)
class Event:
    """Base class of everything the driver tells the core."""


@dataclass(slots=True)
class ClientData(Event):
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True)
class ClientEof(Event):
    """The client shut down its sending side (it may still read)."""

    def __init__(self) -> None:
        pass


@dataclass(slots=True)
class ClientClosed(Event):
    """The client connection is gone; ``error`` is set when it was not a clean close."""

    error: str | None = None

    def __init__(self, error: str | None = None) -> None:
        self.error = error


@dataclass(slots=True)
class UpstreamConnected(Event):
    name: str

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass(slots=True)
class UpstreamConnectFailed(Event):
    """The connect failed. ``local``: for want of a resource here (file
    descriptors, memory), which says nothing about the backend."""

    name: str
    reason: str
    local: bool = False

    def __init__(self, name: str, reason: str, local: bool = False) -> None:
        self.name = name
        self.reason = reason
        self.local = local


@dataclass(slots=True)
class UpstreamData(Event):
    name: str
    data: bytes

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data


@dataclass(slots=True)
class UpstreamEof(Event):
    name: str

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass(slots=True)
class UpstreamClosed(Event):
    name: str
    error: str | None = None

    def __init__(self, name: str, error: str | None = None) -> None:
        self.name = name
        self.error = error


@dataclass(slots=True)
class WriteBlocked(Event):
    """``target``'s pending output passed its high-water mark."""

    target: str

    def __init__(self, target: str) -> None:
        self.target = target


@dataclass(slots=True)
class WriteUnblocked(Event):
    """``target``'s pending output fell below its low-water mark."""

    target: str

    def __init__(self, target: str) -> None:
        self.target = target


@dataclass(slots=True)
class TimerFired(Event):
    timer: Timer

    def __init__(self, timer: Timer) -> None:
        self.timer = timer


@dataclass(slots=True)
class IdleTimeout(Event):
    """Nothing moved in either direction for ``idle_timeout`` seconds."""

    def __init__(self) -> None:
        pass


@dataclass(slots=True)
class PromoteResult(Event):
    """The answer to :class:`Promote`: whether ``name`` is now the primary."""

    name: str
    ok: bool

    def __init__(self, name: str, ok: bool) -> None:
        self.name = name
        self.ok = ok


@dataclass(slots=True)
class PrimaryDown(Event):
    """The health checker declared this session's primary down."""

    reason: str

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(slots=True)
class PrimaryChecked(Event):
    """The answer to :class:`CheckPrimary`: whether ``name`` still accepts connections."""

    name: str
    alive: bool
    reason: str = ""

    def __init__(self, name: str, alive: bool, reason: str = "") -> None:
        self.name = name
        self.alive = alive
        self.reason = reason


@dataclass(slots=True)
class BackendStale(Event):
    """The view says replica ``name`` is stale (a peer marked it): it leaves the session."""

    name: str
    reason: str

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason


@dataclass(slots=True)
class OverMemory(Event):
    """The proxy holds more input for ``name`` over all sessions than ``replica_memory``
    allows: it leaves the session (the server reports it once, for every session)."""

    name: str
    reason: str

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason


@dataclass(slots=True)
class Shutdown(Event):
    """The proxy is stopping and the session's grace period is over."""

    def __init__(self) -> None:
        pass


# --------------------------------------------------------------------- actions


@dataclass(slots=True)
class Action:
    """Base class of everything the core asks the driver to do."""


@dataclass(slots=True)
class Connect(Action):
    name: str

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass(slots=True)
class Write(Action):
    target: str
    data: bytes

    def __init__(self, target: str, data: bytes) -> None:
        self.target = target
        self.data = data


@dataclass(slots=True)
class WriteAll(Action):
    """Write ``data`` to each of ``targets``, in order (one bytes object for all)."""

    targets: tuple[str, ...]
    data: bytes

    def __init__(self, targets: tuple[str, ...], data: bytes) -> None:
        self.targets = targets
        self.data = data


@dataclass(slots=True)
class WriteEof(Action):
    """Half-close ``target`` once everything written before has been sent."""

    target: str

    def __init__(self, target: str) -> None:
        self.target = target


@dataclass(slots=True)
class Close(Action):
    """Close ``target`` after its pending output has been sent."""

    target: str

    def __init__(self, target: str) -> None:
        self.target = target


@dataclass(slots=True)
class Abort(Action):
    """Close ``target`` at once, dropping pending output."""

    target: str

    def __init__(self, target: str) -> None:
        self.target = target


@dataclass(slots=True)
class PauseReading(Action):
    target: str

    def __init__(self, target: str) -> None:
        self.target = target


@dataclass(slots=True)
class ResumeReading(Action):
    target: str

    def __init__(self, target: str) -> None:
        self.target = target


@dataclass(slots=True)
class StartTimer(Action):
    timer: Timer
    delay: float

    def __init__(self, timer: Timer, delay: float) -> None:
        self.timer = timer
        self.delay = delay


@dataclass(slots=True)
class CancelTimer(Action):
    timer: Timer

    def __init__(self, timer: Timer) -> None:
        self.timer = timer


@dataclass(slots=True)
class MarkStale(Action):
    """The replica ``name`` missed input: it must not be promoted any more."""

    name: str
    reason: str

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason


@dataclass(slots=True)
class Promote(Action):
    """Ask to make the replica ``name`` the primary, because ``old`` failed.

    ``kind`` is ``connect`` (before any byte was sent; the session waits for the
    answer) or ``midsession`` (the session already took over; the answer only
    says whether the proxy's view followed). The driver answers with
    :class:`PromoteResult` and gives ``name``'s connection a primary's limits.
    """

    name: str
    old: str
    reason: str
    kind: str = "connect"

    def __init__(self, name: str, old: str, reason: str, kind: str = "connect") -> None:
        self.name = name
        self.old = old
        self.reason = reason
        self.kind = kind


@dataclass(slots=True)
class CheckPrimary(Action):
    """Is ``name`` alive? It closed this session's connection while the replicas kept
    theirs open: a crash (take over) or its own decision (pass the close on). The
    driver answers with :class:`PrimaryChecked`."""

    name: str

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass(slots=True)
class Report(Action):
    """Something an operator should see: logged and counted by the driver.

    ``kind`` is one of ``REPORT_KINDS``.
    """

    kind: str
    name: str
    detail: str

    def __init__(self, kind: str, name: str, detail: str) -> None:
        self.kind = kind
        self.name = name
        self.detail = detail


@dataclass(slots=True)
class Finished(Action):
    """Every connection of the session is closed; ``outcome`` sums it up."""

    outcome: str

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome


#: What a :class:`Report` can be about.
REPORT_KINDS = frozenset(
    {
        "connect_failed",  # an upstream could not be reached
        "dropped",  # an upstream left the session before its end (overflow, error)
        "divergence",  # a replica or shadow answered differently from the primary
        "compare_lost",  # a replica fell so far behind that its output is no longer compared
        "takeover",  # a replica took over the session from a failed primary
        "closed",  # the session could not go on (no replica to take over, too few in sync)
        "allowed",  # replies differed as the protocol's rules allow (detail: the request)
        "key",  # the key the client got (PostgreSQL's BackendKeyData, hex), for cancels
        "own_key",  # a replica's own key for the same session (hex)
    }
)
