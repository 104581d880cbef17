"""One proxied connection, without I/O: events in, actions out.

A :class:`Session` is told what happened (the client sent bytes, an upstream
connected, a write buffer filled up, a timer fired) and answers with what to do
(write these bytes there, pause reading here, mark that replica stale). The I/O
driver in :mod:`replicaproxy.io.driver` carries the actions out; the tests call
:meth:`Session.handle` directly.

Offsets it keeps (DESIGN.md "The session core"):

* ``fed[u]``: client bytes handed to upstream ``u`` (written or held for it).
  Every upstream still in the session has been handed the same prefix of the
  one client stream; when every upstream is connected ``fed`` is equal for all.
* ``out[u]``: bytes received from ``u``; ``delivered``: bytes given to the
  client. The *frontier* is how much of the primary's output stream is known:
  normally ``out[primary]``; after a takeover by a replica that was behind, the
  new primary first repeats bytes up to the frontier (compared, not sent again).
* async mode: ``delivered`` is the frontier (the client gets primary bytes at
  once). sync mode: ``delivered`` is the least ``out[r]`` over the session's
  in-sync replicas, capped at the frontier: the client gets a byte only once
  every in-sync replica has produced the same byte.
* Each replica's and shadow's output is compared with the primary's at equal
  offsets. The primary's stream is kept only as far back as someone still needs
  it (the slowest compared upstream, or the client in sync mode), at most
  ``compare_window`` bytes; an upstream ahead of the primary keeps its extra
  bytes, also at most ``compare_window`` before its reading is paused.
* Takeover to ``r``: the client continues with ``r``'s output from offset
  ``delivered``: never a byte before it again, never a gap, and only where
  ``r``'s output has matched so far.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from replicaproxy.core.events import (
    CLIENT,
    Abort,
    Action,
    BackendStale,
    CancelTimer,
    ClientClosed,
    ClientData,
    ClientEof,
    Close,
    Connect,
    Event,
    Finished,
    IdleTimeout,
    MarkStale,
    PauseReading,
    PrimaryDown,
    Promote,
    PromoteResult,
    Report,
    ResumeReading,
    Shutdown,
    StartTimer,
    Timer,
    TimerFired,
    UpstreamClosed,
    UpstreamConnected,
    UpstreamConnectFailed,
    UpstreamData,
    UpstreamEof,
    Write,
    WriteAll,
    WriteBlocked,
    WriteEof,
    WriteUnblocked,
)

Role = Literal["primary", "replica", "shadow"]

#: How many bytes of each side a divergence report shows.
EXCERPT_BYTES = 16


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-session bounds, taken from the proxy's config."""

    #: Input held for one replica or shadow that is slower than the primary.
    replica_buffer: int = 8 * 1024 * 1024
    #: Output kept to compare a replica with the primary (either may be ahead).
    #: 1 MiB holds several round trips of a chatty protocol; a replica further
    #: behind than that is no longer compared in this session.
    compare_window: int = 1024 * 1024
    #: After the session's normal end, how long replicas may take to finish.
    close_grace: float = 0.2
    #: After closing, how long an upstream may take to accept its last bytes.
    linger: float = 2.0
    #: "sync": the client gets a byte only after every in-sync replica produced it.
    mode: Literal["async", "sync"] = "async"
    #: Sync mode: how long a replica may hold back a byte the primary sent.
    replica_timeout: float = 2.0
    #: Sync mode: fewer in-sync replicas than this left in the session ends it.
    min_in_sync: int = 0
    #: A diverging replica also becomes stale (always so in sync mode).
    divergence_stale: bool = False


@dataclass(frozen=True, slots=True)
class Member:
    """A backend taking part in a session, as the session is told about it."""

    name: str
    role: Role


class _State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"  # Close or Abort was asked for; waiting for UpstreamClosed
    CLOSED = "closed"


class _Upstream:
    """What the session knows about one upstream connection."""

    __slots__ = (
        "ahead",
        "compared",
        "eof_received",
        "eof_sent",
        "fed",
        "fed_at_eof",
        "held",
        "held_size",
        "matched",
        "name",
        "out",
        "read_paused",
        "role",
        "state",
    )

    def __init__(self, member: Member) -> None:
        self.name = member.name
        self.role: Role = member.role
        self.state = _State.CONNECTING
        self.held: list[bytes] = []  # input waiting for the connection
        self.held_size = 0
        self.fed = 0
        self.out = 0
        self.eof_received = False
        self.fed_at_eof = 0  # input handed to it when its EOF came
        self.eof_sent = False
        self.compared = member.role != "primary"  # output still compared with the primary's
        self.matched = True  # no mismatch seen so far
        self.ahead = bytearray()  # output beyond the primary's, not yet compared
        self.read_paused = False

    @property
    def live(self) -> bool:
        return self.state in (_State.CONNECTING, _State.OPEN)


class Session:
    """The state of one client connection and its upstream connections.

    Create it with the session's members (exactly one primary), call
    :meth:`start` once, then :meth:`handle` for every event. Both return the
    actions to carry out, in order.
    """

    # Less memory per idle session, and a misspelt attribute fails at once.
    __slots__ = (
        "_client_closing",
        "_client_pause",
        "_ending",
        "_eof_forwarded",
        "_eof_pending",
        "_feeding",
        "_frontier",
        "_gate_open",
        "_half_window",
        "_linger_started",
        "_mirrors",
        "_primary",
        "_primary_lost",
        "_primary_pause",
        "_promoting",
        "_replica_timer",
        "_route",
        "_sync",
        "_ups",
        "_window",
        "_window_base",
        "client_closed",
        "client_eof",
        "delivered",
        "finished",
        "limits",
        "outcome",
        "promoted",
        "received",
        "takeovers",
    )

    def __init__(self, members: Sequence[Member], limits: Limits | None = None) -> None:
        primaries = [m for m in members if m.role == "primary"]
        if len(primaries) != 1:
            raise ValueError(f"a session needs exactly one primary, got {len(primaries)}")
        names = [m.name for m in members]
        if len(set(names)) != len(names) or CLIENT in names:
            raise ValueError(f"member names must be distinct: {names}")
        self.limits = limits or Limits()
        self._half_window = self.limits.compare_window // 2
        self._ups: dict[str, _Upstream] = {m.name: _Upstream(m) for m in members}
        self._primary = self._ups[primaries[0].name]
        # Upstreams that still get input, primary first (the order of writes).
        self._feeding: list[_Upstream] = [self._primary] + [
            u for u in self._ups.values() if u is not self._primary
        ]
        self._mirrors: list[_Upstream] = self._feeding[1:]  # compared with the primary
        self._gate_open = False  # input flows once the primary is connected
        #: Where client bytes go while every upstream is connected (None: work it out).
        self._route: tuple[str, ...] | None = None
        self._sync = self.limits.mode == "sync"
        self._client_pause: set[str] = set()
        self._primary_pause: set[str] = set()
        self.received = 0  # bytes read from the client
        self.delivered = 0  # bytes written to the client
        self._frontier = 0  # bytes of the primary's output stream known
        self._window = bytearray()  # that stream from _window_base to the frontier
        self._window_base = 0
        self._eof_pending = False  # the primary's EOF came, the replicas did not confirm it
        self._eof_forwarded = False  # the client got its EOF
        self._replica_timer = False  # sync mode: REPLICA_TIMEOUT is running
        #: How often a replica took the session over mid-way.
        self.takeovers = 0
        self.client_eof = False
        self.client_closed = False
        self._client_closing = False
        self._ending = False
        self._linger_started = False
        self.outcome: str | None = None
        self.finished = False
        self._primary_lost: str | None = None  # why the first primary could not be reached
        self._promoting: _Upstream | None = None
        #: The replica that replaced the primary at connect time, if any.
        self.promoted: str | None = None

    # ----------------------------------------------------------- introspection

    @property
    def primary(self) -> str:
        return self._primary.name

    def fed(self, name: str) -> int:
        """Client bytes handed to upstream ``name`` so far."""
        return self._ups[name].fed

    def out(self, name: str) -> int:
        """Bytes received from upstream ``name`` so far."""
        return self._ups[name].out

    def in_session(self, name: str) -> bool:
        """Whether ``name`` still takes part (connecting or connected)."""
        return self._ups[name].live

    def matched(self, name: str) -> bool:
        """Whether ``name``'s output has equalled the primary's so far."""
        return self._ups[name].matched

    def held(self, name: str) -> int:
        """Input bytes held in the session for ``name`` until it connects."""
        return self._ups[name].held_size

    def progress(self) -> int:
        """Bytes read so far from the client and every upstream: unchanged means idle."""
        return self.received + sum(u.out for u in self._ups.values())

    @property
    def members(self) -> list[str]:
        return list(self._ups)

    # ------------------------------------------------------------------ events

    def start(self) -> list[Action]:
        """Connect every upstream; hold the client's input until the primary is there."""
        actions: list[Action] = [Connect(u.name) for u in self._ups.values()]
        self._pause_client("connect", actions)
        return actions

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return the actions it calls for."""
        actions: list[Action] = []
        if self.finished:
            return actions
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"unknown event {event!r}")
        handler(self, event, actions)
        self._check_finished(actions)
        return actions

    def client_data(self, data: bytes) -> list[Action]:
        """The hot path's shortcut for ``handle(ClientData(data))``."""
        route = self.route()
        if route is not None:
            self.count_input(len(data))
            return [WriteAll(route, data)]
        return self.handle(ClientData(data))

    # Shortcuts for the driver's hot path. route() and passes() are questions whose
    # answers hold until the next handle() (nothing else changes what they read);
    # while they hold, the driver moves chunks by itself and tells the session only
    # how many bytes moved, with count_input() and count_output(), before anything
    # else. passed() and checked() are per chunk. A property test holds every
    # composition of them to handle() alone.

    def route(self) -> tuple[str, ...] | None:
        """Where every client byte goes for now; None: hand client data to :meth:`handle`.

        While it holds, each chunk is written to every upstream of the route, in its
        order, and counted with :meth:`count_input`.
        """
        return None if self.finished else self._route

    def count_input(self, n: int) -> None:
        """``n`` client bytes went the way :meth:`route` said (one chunk or many)."""
        self.received += n
        for u in self._feeding:
            u.fed += n

    def passes(self) -> bool:
        """Whether the primary's output goes straight to the client for now.

        True in async mode while no mirror is compared with the primary, the primary
        repeats nothing and the client is there: each chunk of the primary's is
        written to the client and counted with :meth:`count_output`.
        """
        p = self._primary
        return not (
            self._sync
            or self.finished
            or p.out != self._frontier
            or self._client_gone()
            or self._window
            or any(r.compared for r in self._mirrors)
        )

    def count_output(self, n: int) -> None:
        """``n`` bytes of the primary's went to the client, as :meth:`passes` said."""
        end = self._primary.out + n
        self._primary.out = self._frontier = self.delivered = self._window_base = end

    def passed(self, name: str, data: bytes) -> bool:
        """True: the primary's ``data`` goes to the client as it is; nothing else to do.

        The fastest form of ``handle(UpstreamData(name, data))`` in async mode, while
        no compared mirror is ahead of the primary or near the end of the compare
        window: the bytes are kept for the mirrors to be compared with, and pass
        (with no compared mirror at all, :meth:`passes` is faster still).
        False: nothing was done; try :meth:`checked`, then :meth:`handle`.
        """
        p = self._primary
        start = p.out
        if (
            p.name != name
            or self._sync
            or self.finished
            or start != self._frontier  # a new primary still repeating the stream
            or self._client_closing  # (_client_gone(), inline: this runs per chunk)
            or self.client_closed
        ):
            return False
        end = start + len(data)
        lowest = end  # the output of the compared mirror furthest behind
        for r in self._mirrors:
            if r.compared:
                out = r.out
                if out > start or r.eof_received:
                    return False  # ahead (compare now) or ended (maybe early)
                if out < lowest:  # noqa: PLR1730 (min() would be a call per chunk)
                    lowest = out
        window = self._window
        if lowest == end:
            if window:
                return False  # (cleared by the next trim)
            self._window_base = end
        elif end - lowest > self._half_window or "window" in self._primary_pause:
            return False  # the window's bound is near: pause or resume the primary
        else:
            if not window:
                self._window_base = start
            window += data
        p.out = self._frontier = self.delivered = end
        return True

    def checked(self, name: str, data: bytes) -> bool:
        """True: a mirror's ``data`` matched the primary's output there; nothing to do.

        The fastest form of ``handle(UpstreamData(name, data))`` in async mode, for a
        mirror behind the primary (the usual case: its input waits for the flush tick)
        whose bytes match. False: nothing was done; hand the data to :meth:`handle`
        (which reports a mismatch).
        """
        r = self._ups[name]
        if (
            r is self._primary
            or not r.compared
            or self._sync
            or self.finished
            or "window" in self._primary_pause
        ):
            return False
        start = r.out
        end = start + len(data)
        frontier = self._frontier
        base = self._window_base
        # _same(window, start - base, data, 0, len(data)), inline: this runs per chunk.
        if end > frontier or not self._window.startswith(data, start - base):
            return False
        r.out = end
        # Within the window's bound (no pause above): only its front may go.
        need = self._needed_from()
        if need >= frontier:
            self._window.clear()
            self._window_base = frontier
        elif need > base:
            del self._window[: need - base]
            self._window_base = need
        return True

    def _on_client_data(self, event: ClientData, actions: list[Action]) -> None:
        data = event.data
        if self.client_eof or self._ending:
            return  # nothing may follow EOF; after the end, input goes nowhere
        if (
            self._route is None
            and self._gate_open
            and not self._held_any()
            and all(u.state is _State.OPEN for u in self._feeding)
        ):
            self._route = tuple(u.name for u in self._feeding)
        if self._route is not None:
            actions.extend(self.client_data(data))
            return
        n = len(data)
        self.received += n
        gate = self._gate_open
        overflow: list[_Upstream] = []
        for u in self._feeding:
            u.fed += n
            if gate and u.state is _State.OPEN:
                actions.append(Write(u.name, data))
            else:
                u.held.append(data)
                u.held_size += n
                if u.role != "primary" and u.held_size > self.limits.replica_buffer:
                    overflow.append(u)
        for u in overflow:
            self._drop(u, f"more than {self.limits.replica_buffer} bytes of input pending", actions)

    def _on_client_eof(self, _event: ClientEof, actions: list[Action]) -> None:
        if self.client_eof:
            return
        self.client_eof = True
        self._route = None
        if self._gate_open:
            for u in self._feeding:
                if u.state is _State.OPEN:
                    self._send_eof(u, actions)
        self._maybe_end(actions)

    def _on_client_closed(self, event: ClientClosed, actions: list[Action]) -> None:
        self.client_closed = True
        if self._ending:
            return
        # The client is gone (reset, or an error writing to it). What it sent is
        # still handed to every upstream: close them after their buffers drain.
        self._end("client_reset" if event.error else "client_closed", actions)

    def _on_connected(self, event: UpstreamConnected, actions: list[Action]) -> None:
        u = self._ups[event.name]
        if u.state is not _State.CONNECTING:
            return
        u.state = _State.OPEN
        self._route = None
        if self._ending:
            self._close(u, actions)
        elif u is self._primary:
            self._open_gate(actions)
        elif self._gate_open:
            self._release_held(u, actions)
        elif self._primary_lost is not None:
            self._replace_primary(actions)

    def _release_held(self, u: _Upstream, actions: list[Action]) -> None:
        for chunk in u.held:
            actions.append(Write(u.name, chunk))
        u.held.clear()
        u.held_size = 0
        if self.client_eof:
            self._send_eof(u, actions)

    def _on_connect_failed(self, event: UpstreamConnectFailed, actions: list[Action]) -> None:
        u = self._ups[event.name]
        if u.state is not _State.CONNECTING:
            return
        u.state = _State.CLOSED
        self._route = None
        self._forget(u, actions)
        if event.local:
            # Out of descriptors or memory here: no backend is to blame, so nobody
            # becomes stale and nobody is promoted; the client is turned away.
            actions.append(Report("closed", u.name, f"cannot connect: {event.reason} (local)"))
            self._refuse(actions, "overloaded")
            return
        actions.append(Report("connect_failed", u.name, event.reason))
        if u is self._primary:
            self._primary_lost = event.reason
            self._replace_primary(actions)
            return
        if u.role == "replica":
            actions.append(MarkStale(u.name, f"connect failed: {event.reason}"))
        if self._primary_lost is not None:
            self._replace_primary(actions)

    def _replace_primary(self, actions: list[Action]) -> None:
        """Failover at connect: ask to promote the first reachable replica, in order.

        Nothing was written anywhere yet (the gate opens with the primary), so
        any in-sync replica of the session can take over from the first byte.
        """
        if self._promoting is not None or self._ending:
            return
        for r in self._mirrors:
            if r.role != "replica" or not r.live:
                continue
            if r.state is _State.CONNECTING:
                return  # an earlier replica in order may still answer: wait for it
            self._promoting = r
            reason = f"primary unreachable: {self._primary_lost}"
            actions.append(Promote(r.name, self._primary.name, reason, "connect"))
            return
        self._refuse(actions)

    def _refuse(self, actions: list[Action], outcome: str = "refused") -> None:
        for m in self._feeding:
            self._abort(m, actions)
        self._end(outcome, actions)

    def _on_promote_result(self, event: PromoteResult, actions: list[Action]) -> None:
        r = self._promoting
        if r is None or r.name != event.name:
            return
        self._promoting = None
        if not event.ok or not r.live or self._ending:
            if not self._ending:
                self._refuse(actions)
            return
        old = self._primary
        r.role = "primary"
        r.compared = False
        r.ahead = bytearray()
        self._mirrors.remove(r)
        self._feeding.remove(r)
        self._feeding.insert(0, r)
        self._route = None
        self._primary = r
        self.promoted = r.name
        if old in self._feeding:
            self._feeding.remove(old)
            self._route = None
        if r.state is _State.OPEN:
            self._open_gate(actions)

    def _open_gate(self, actions: list[Action]) -> None:
        self._gate_open = True
        self._route = None
        for m in self._feeding:
            if m.state is _State.OPEN:
                self._release_held(m, actions)
        self._resume_client("connect", actions)

    def _on_primary_down(self, event: PrimaryDown, actions: list[Action]) -> None:
        p = self._primary
        if not self._gate_open and self._primary_lost is None and p.live:
            # Still connecting, nothing sent anywhere: as good as a failed connect.
            self._abort(p, actions)
            self._forget(p, actions)
            actions.append(Report("connect_failed", p.name, f"marked down: {event.reason}"))
            self._primary_lost = f"marked down: {event.reason}"
            self._replace_primary(actions)
            return
        if p.live:
            self._takeover(f"{p.name} marked down: {event.reason}", actions)

    def _on_backend_stale(self, event: BackendStale, actions: list[Action]) -> None:
        """A replica stale in the view must not go on getting this session's input as one."""
        u = self._ups.get(event.name)
        if u is None or u is self._primary or u.role != "replica" or not u.live:
            return
        self._drop(u, f"stale in the view: {event.reason}", actions)

    def _held_any(self) -> bool:
        return any(u.held for u in self._feeding)

    def _on_upstream_data(self, event: UpstreamData, actions: list[Action]) -> None:
        u = self._ups[event.name]
        data = event.data
        if u is self._primary:
            self._primary_output(data, actions)
        elif u.compared:
            self._mirror_output(u, data, actions)
        else:
            u.out += len(data)  # read and dropped: never left unread in the socket

    def _primary_output(self, data: bytes, actions: list[Action]) -> None:
        p = self._primary
        start = p.out
        p.out = start + len(data)
        behind = self._frontier - start
        if behind > 0:
            # A new primary repeating what the stream already holds: compare, don't resend.
            k = min(len(data), behind)
            if not _same(self._window, start - self._window_base, data, 0, k):
                self._splice_refused(start, data, actions)
                return
            if k == len(data):
                if self._sync:
                    self._advance_sync(actions)
                else:
                    self._trim_window(actions)
                return
            data = data[k:]
        start = self._frontier
        n = len(data)
        # The stream grows first: a comparison below may deliver or trim it.
        self._frontier = start + n
        if not self._window:
            self._window_base = start
        self._window += data
        if not self._sync:
            if not self._client_gone():
                actions.append(Write(CLIENT, data))
            self.delivered = self._frontier
        for r in self._mirrors:
            if not r.compared:
                continue
            if r.out > start:
                k = min(n, r.out - start)
                if not self._compare(r, start, data, 0, r.ahead, 0, k, actions):
                    continue
                del r.ahead[:k]
                if r.read_paused and len(r.ahead) <= self._half_window:
                    r.read_paused = False
                    actions.append(ResumeReading(r.name))
            if r.out < self._frontier and r.eof_received:
                self._ended_early(r, actions)
        if self._sync:
            self._advance_sync(actions)
        else:
            self._trim_window(actions)

    def _mirror_output(self, r: _Upstream, data: bytes, actions: list[Action]) -> None:
        start = r.out
        n = len(data)
        r.out = start + n
        frontier = self._frontier
        k = 0
        if start < frontier:
            k = min(n, frontier - start)
            if not self._compare(
                r, start, self._window, start - self._window_base, data, 0, k, actions
            ):
                return
        if k < n:
            r.ahead += data[k:] if k else data
            if not r.read_paused and len(r.ahead) > self.limits.compare_window:
                r.read_paused = True
                actions.append(PauseReading(r.name))
            if self._eof_pending and r.role == "replica":
                # The primary said EOF, and this replica has more to say: the primary
                # ended early (a crash that closed with FIN, say).
                self._takeover(f"{self._primary.name} ended its output early", actions)
                return
        if self._sync:
            self._advance_sync(actions)
        else:
            self._trim_window(actions)

    def _compare(
        self,
        r: _Upstream,
        offset: int,
        primary: bytes | bytearray,
        p_at: int,
        mirror: bytes | bytearray,
        m_at: int,
        k: int,
        actions: list[Action],
    ) -> bool:
        """Compare ``k`` bytes at ``offset``; on a mismatch, report and stop comparing ``r``."""
        if _same(primary, p_at, mirror, m_at, k):
            return True
        with memoryview(primary) as pfull, memoryview(mirror) as mfull:
            pv = pfull[p_at : p_at + k]
            mv = mfull[m_at : m_at + k]
            i = next(i for i in range(k) if pv[i] != mv[i])
            detail = (
                f"output differs at offset {offset + i}: primary {_excerpt(pv[i:])}, "
                f"{r.name} {_excerpt(mv[i:])}"
            )
            pv.release()
            mv.release()
        self._diverged(r, detail, actions)
        return False

    def _ended_early(self, r: _Upstream, actions: list[Action]) -> None:
        """``r`` closed before producing what the primary did: dead, or answering less.

        Either way it cannot vouch for the primary any more, and it may not have
        read its input: it leaves the session, and a replica becomes stale.
        """
        r.matched = False
        self._drop(
            r,
            f"closed its output at offset {r.out}, before the primary's "
            f"{self._frontier} bytes (it crashed, or answers differently)",
            actions,
        )

    def _diverged(self, r: _Upstream, detail: str, actions: list[Action]) -> None:
        r.matched = False
        self._stop_comparing(r, actions)
        actions.append(Report("divergence", r.name, detail))
        if r.role == "replica" and (self._sync or self.limits.divergence_stale):
            # Its answers differ: it cannot vouch for the primary's (sync), and the
            # operator asked to treat a diverging replica as one that missed data.
            self._drop(r, f"diverged: {detail}", actions, report=False)

    def _stop_comparing(self, r: _Upstream, actions: list[Action]) -> None:
        r.compared = False
        r.ahead = bytearray()
        if r.read_paused:
            r.read_paused = False
            actions.append(ResumeReading(r.name))
        self._after_mirror_change(actions)

    def _after_mirror_change(self, actions: list[Action]) -> None:
        """A mirror left the comparisons: fewer may hold back delivery or the window."""
        if self._sync:
            self._advance_sync(actions)
        else:
            self._trim_window(actions)
        self._check_eof(actions)

    def _participants(self) -> list[_Upstream]:
        """Replicas that vouch for the primary's output: in the session, matching so far."""
        return [
            r for r in self._mirrors
            if r.role == "replica" and r.compared and r.live
        ]  # fmt: skip

    def _advance_sync(self, actions: list[Action]) -> None:
        """Sync mode: give the client what every in-sync replica has confirmed."""
        # A new primary repeating the stream vouches only for what it repeated so far.
        confirmed = min(self._frontier, self._primary.out)
        for r in self._participants():
            confirmed = min(confirmed, r.out)
        if confirmed > self.delivered:
            if not self._client_gone():
                lo = self.delivered - self._window_base
                actions.append(
                    Write(CLIENT, bytes(self._window[lo : confirmed - self._window_base]))
                )
            self.delivered = confirmed
            if self._replica_timer:
                self._replica_timer = False
                actions.append(CancelTimer(Timer.REPLICA_TIMEOUT))
        waiting = self.delivered < self._frontier
        if waiting and not self._replica_timer and not self._ending:
            self._replica_timer = True
            actions.append(StartTimer(Timer.REPLICA_TIMEOUT, self.limits.replica_timeout))
        elif not waiting and self._replica_timer:
            self._replica_timer = False
            actions.append(CancelTimer(Timer.REPLICA_TIMEOUT))
        self._trim_window(actions)

    def _needed_from(self) -> int:
        """The stream's first offset still needed.

        By a compared mirror yet to match it, the client yet to get it (sync mode),
        or a new primary yet to repeat it.
        """
        need = min(self._frontier, self._primary.out, self.delivered)
        for r in self._mirrors:
            if r.compared and r.out < need:
                need = r.out
        return need

    def _trim_window(self, actions: list[Action]) -> None:
        """Drop the primary's stream where nobody needs it any more; bound what is kept."""
        frontier = self._frontier
        while True:
            need = self._needed_from()
            if need >= frontier:
                self._window.clear()
                self._window_base = frontier
                self._resume_primary("window", actions)
                return
            if frontier - need <= self.limits.compare_window:
                break
            if self._sync or need in (self.delivered, self._primary.out):
                # Sync mode never stops comparing a replica it waits for: hold the
                # primary instead, until the replicas catch up or time out.
                self._pause_primary("window", actions)
                break
            for r in self._mirrors:
                if r.compared and r.out == need:
                    r.compared = False
                    r.ahead = bytearray()
                    actions.append(
                        Report(
                            "compare_lost",
                            r.name,
                            f"output more than {self.limits.compare_window} bytes behind "
                            f"the primary's (at {r.out} of {frontier})",
                        )
                    )
        if frontier - need <= self._half_window:
            self._resume_primary("window", actions)
        drop = need - self._window_base
        if drop > 0:
            del self._window[:drop]
            self._window_base = need

    def _splice_refused(self, offset: int, data: bytes, actions: list[Action]) -> None:
        """The new primary's output differs from what the client already has: stop."""
        p = self._primary
        i = next(
            i
            for i in range(min(len(data), self._frontier - offset))
            if data[i] != self._window[offset - self._window_base + i]
        )
        at = offset - self._window_base + i
        detail = (
            f"output differs at offset {offset + i} from what the client already has: "
            f"client got {_excerpt(memoryview(bytes(self._window[at : at + EXCERPT_BYTES])))}, "
            f"{p.name} {_excerpt(memoryview(data)[i:])}; closing instead of splicing"
        )
        actions.append(Report("divergence", p.name, detail))
        self._end("diverged", actions)

    # ---------------------------------------------------------------- takeover

    def _takeover(self, reason: str, actions: list[Action]) -> None:
        """The primary failed mid-session: continue the client's stream from a replica."""
        old = self._primary
        if self._ending:
            return
        candidates = [r for r in self._participants() if r.state is _State.OPEN]
        if self._client_gone() or not candidates:
            actions.append(
                Report(
                    "closed",
                    old.name,
                    f"{reason}; no in-sync replica of this session matched it to take over",
                )
            )
            self._end("primary_failed", actions)
            return
        r = candidates[0]
        self._abort(old, actions)
        self._forget(old, actions)
        self._mirrors.remove(r)
        self._feeding.remove(r)
        self._feeding.insert(0, r)
        self._route = None
        r.role = "primary"
        r.compared = False
        self._primary = r
        self.takeovers += 1
        self.promoted = r.name
        if r.out > self._frontier:
            # r is ahead: its extra bytes (already compared with nothing) extend the stream.
            start = self._frontier
            extra = bytes(r.ahead)
            for m in self._mirrors:
                if m.compared and m.out > start:
                    k = min(m.out, r.out) - start
                    if self._compare(m, start, extra, 0, m.ahead, 0, k, actions):
                        del m.ahead[:k]
            if not self._window:
                self._window_base = start
            self._window += extra
            self._frontier = r.out
        r.ahead = bytearray()
        offset = self.delivered
        if self._sync:
            self._advance_sync(actions)
        else:
            tail = self._frontier - self.delivered
            if tail > 0 and not self._client_gone():
                lo = self.delivered - self._window_base
                actions.append(Write(CLIENT, bytes(self._window[lo : lo + tail])))
            self.delivered = self._frontier
            self._trim_window(actions)
        actions.append(Promote(r.name, old.name, reason, "midsession"))
        actions.append(
            Report("takeover", r.name, f"took over from {old.name} at offset {offset}: {reason}")
        )
        # The old primary's pauses do not apply to the new one.
        self._resume_client("primary", actions)
        if self._primary_pause:
            actions.append(PauseReading(r.name))
        self._eof_pending = False
        actions.append(CancelTimer(Timer.PRIMARY_EOF))
        if r.eof_received:
            self._primary_eof(actions)

    # --------------------------------------------------------------------- EOF

    def _primary_eof(self, actions: list[Action]) -> None:
        self._eof_pending = True
        self._check_eof(actions)

    def _check_eof(self, actions: list[Action]) -> None:
        """Pass the primary's EOF on once every in-sync replica ended at the same offset."""
        if not self._eof_pending or self._eof_forwarded or self._ending:
            return
        participants = self._participants()
        for r in participants:
            if r.out > self._frontier:
                self._takeover(f"{self._primary.name} ended its output early", actions)
                return
        if all(r.eof_received and r.out == self._frontier for r in participants):
            self._forward_eof(actions)
        else:
            actions.append(StartTimer(Timer.PRIMARY_EOF, self.limits.close_grace))

    def _forward_eof(self, actions: list[Action]) -> None:
        self._eof_pending = False
        self._eof_forwarded = True
        actions.append(CancelTimer(Timer.PRIMARY_EOF))
        if not self._client_gone():
            actions.append(WriteEof(CLIENT))
        self._maybe_end(actions)

    def _client_gone(self) -> bool:
        return self._client_closing or self.client_closed

    def _on_upstream_eof(self, event: UpstreamEof, actions: list[Action]) -> None:
        u = self._ups[event.name]
        if u.eof_received or not u.live:
            return
        u.eof_received = True
        u.fed_at_eof = u.fed
        if u is self._primary:
            self._primary_eof(actions)
            return
        if self._ending:
            self._close(u, actions)
            return
        if u.compared and u.out < self._frontier:
            self._ended_early(u, actions)
        else:
            self._check_eof(actions)

    def _on_upstream_closed(self, event: UpstreamClosed, actions: list[Action]) -> None:
        u = self._ups[event.name]
        was = u.state
        u.state = _State.CLOSED
        self._route = None
        self._forget(u, actions)
        if was is _State.CLOSING:
            if u.role == "replica":
                missed = self._may_have_missed_input(u, event.error)
                if missed:
                    actions.append(MarkStale(u.name, missed))
            return
        if was is _State.CLOSED:
            return
        reason = event.error or "closed by the backend"
        if u is self._primary:
            self._takeover(f"connection to {u.name} lost: {reason}", actions)
            return
        actions.append(Report("dropped", u.name, f"connection lost: {reason}"))
        if u.role == "replica":
            actions.append(MarkStale(u.name, f"connection lost mid-session: {reason}"))
            self._check_min_in_sync(actions)

    def _may_have_missed_input(self, u: _Upstream, error: str | None) -> str | None:
        """Why a replica that we closed may not have read all its input, or None.

        A peer that closes with unread input sends RST, so an EOF (FIN) means it
        read what had reached it. Input handed to it after its EOF went to a closed
        socket, which is fine only where the primary had closed at the same point.
        """
        if u.eof_received:
            p = self._primary
            if u.fed > u.fed_at_eof and not (p.eof_received and p.fed_at_eof <= u.fed_at_eof):
                return (
                    f"closed its side after {u.fed_at_eof} input bytes, before the primary "
                    f"did; {u.fed - u.fed_at_eof} more were sent to it"
                )
            return None
        if error:
            return f"connection lost while closing: {error}"
        return None

    def _on_write_blocked(self, event: WriteBlocked, actions: list[Action]) -> None:
        target = event.target
        if target == CLIENT:
            # The client reads slower than the primary answers: stop reading the primary.
            self._pause_primary("client", actions)
            return
        u = self._ups[target]
        if not u.live:
            return
        if u is self._primary:
            self._pause_client("primary", actions)
        else:
            self._drop(u, f"more than {self.limits.replica_buffer} bytes of input pending", actions)

    def _on_write_unblocked(self, event: WriteUnblocked, actions: list[Action]) -> None:
        target = event.target
        if target == CLIENT:
            self._resume_primary("client", actions)
        elif self._ups[target] is self._primary:
            self._resume_client("primary", actions)

    def _on_timer(self, event: TimerFired, actions: list[Action]) -> None:
        timer = event.timer
        if timer is Timer.CLOSE_GRACE:
            for u in self._ups.values():
                if u.live:
                    self._close(u, actions)
        elif timer is Timer.LINGER:
            for u in self._ups.values():
                if u.state is _State.CLOSING:
                    if u.role == "replica":
                        actions.append(
                            MarkStale(
                                u.name,
                                f"did not take its last input within {self.limits.linger} s "
                                "of the session's end",
                            )
                        )
                    actions.append(Abort(u.name))
            if not self.client_closed:
                actions.append(Abort(CLIENT))
        elif timer is Timer.PRIMARY_EOF:
            if not self._eof_pending or self._ending:
                return
            if self._sync:
                for r in self._participants():
                    if r.out < self._frontier:
                        self._drop(
                            r,
                            f"did not confirm the primary's last {self._frontier - r.out} bytes "
                            f"within close_grace ({self.limits.close_grace} s)",
                            actions,
                        )
                if self._ending:
                    return
                self._advance_sync(actions)
            self._forward_eof(actions)
        elif timer is Timer.REPLICA_TIMEOUT:
            self._replica_timer = False
            if self._ending:
                return
            for r in self._participants():
                if r.out < self._frontier:
                    self._drop(
                        r,
                        f"held back {self._frontier - r.out} reply bytes for more than "
                        f"replica_timeout ({self.limits.replica_timeout} s)",
                        actions,
                    )
            if not self._ending:
                self._advance_sync(actions)

    def _on_idle(self, _event: IdleTimeout, actions: list[Action]) -> None:
        self._end("idle_timeout", actions)

    def _on_shutdown(self, _event: Shutdown, actions: list[Action]) -> None:
        self._end("shutdown", actions)

    # ----------------------------------------------------------------- helpers

    def _send_eof(self, u: _Upstream, actions: list[Action]) -> None:
        if not u.eof_sent:
            u.eof_sent = True
            actions.append(WriteEof(u.name))

    def _pause_client(self, reason: str, actions: list[Action]) -> None:
        if not self._client_pause and not self.client_closed:
            actions.append(PauseReading(CLIENT))
        self._client_pause.add(reason)

    def _resume_client(self, reason: str, actions: list[Action]) -> None:
        if reason in self._client_pause:
            self._client_pause.discard(reason)
            if not self._client_pause and not self.client_closed and not self._ending:
                actions.append(ResumeReading(CLIENT))

    def _pause_primary(self, reason: str, actions: list[Action]) -> None:
        if not self._primary_pause and self._primary.state is _State.OPEN:
            actions.append(PauseReading(self._primary.name))
        self._primary_pause.add(reason)

    def _resume_primary(self, reason: str, actions: list[Action]) -> None:
        if reason in self._primary_pause:
            self._primary_pause.discard(reason)
            if not self._primary_pause and self._primary.state is _State.OPEN:
                actions.append(ResumeReading(self._primary.name))

    def _forget(self, u: _Upstream, actions: list[Action]) -> None:
        """Take ``u`` out of the input stream and the comparisons."""
        if u in self._feeding:
            self._feeding.remove(u)
            self._route = None
        u.held.clear()
        u.held_size = 0
        if u.compared:
            u.compared = False
            u.ahead = bytearray()
            self._after_mirror_change(actions)

    def _drop(
        self, u: _Upstream, reason: str, actions: list[Action], *, report: bool = True
    ) -> None:
        """Remove a replica or shadow from the session at once (it fell behind, or worse)."""
        self._abort(u, actions)
        if report:
            actions.append(Report("dropped", u.name, reason))
        if u.role == "replica":
            actions.append(MarkStale(u.name, reason))
        self._forget(u, actions)
        if u.role == "replica":
            self._check_min_in_sync(actions)

    def _check_min_in_sync(self, actions: list[Action]) -> None:
        """Sync mode: with fewer in-sync replicas than min_in_sync, a session cannot go on."""
        if not self._sync or self._ending or not self._gate_open:
            return
        left = len(self._participants())
        if left < self.limits.min_in_sync:
            actions.append(
                Report(
                    "closed",
                    self._primary.name,
                    f"{left} in-sync replicas left in the session, min_in_sync is "
                    f"{self.limits.min_in_sync}",
                )
            )
            self._end("min_in_sync", actions)

    def _abort(self, u: _Upstream, actions: list[Action]) -> None:
        if u.live:
            u.state = _State.CLOSING
            self._route = None
            actions.append(Abort(u.name))

    def _close(self, u: _Upstream, actions: list[Action]) -> None:
        if u.state is _State.OPEN:
            u.state = _State.CLOSING
            self._route = None
            actions.append(Close(u.name))
            self._start_linger(actions)
        elif u.state is _State.CONNECTING:
            # It never got a byte: nothing to lose by aborting the attempt.
            self._abort(u, actions)
            if u.role == "replica" and self._gate_open and u.fed:
                # The primary got input that this replica never will.
                actions.append(MarkStale(u.name, "session ended before it connected"))

    def _start_linger(self, actions: list[Action]) -> None:
        if not self._linger_started:
            self._linger_started = True
            actions.append(StartTimer(Timer.LINGER, self.limits.linger))

    def _maybe_end(self, actions: list[Action]) -> None:
        """The normal end: the client and the primary have both finished sending."""
        if self.client_eof and self._eof_forwarded and not self._ending:
            self._end("ok", actions)

    def _end(self, outcome: str, actions: list[Action]) -> None:
        """Wind the session down; the client's input reaches every upstream first."""
        if self._ending:
            return
        self._ending = True
        self._route = None
        if self.outcome is None:
            self.outcome = outcome
        if outcome == "ok":
            self._check_final_lengths(actions)
        if not self._client_gone():
            self._client_closing = True
            actions.append(Close(CLIENT))
            self._start_linger(actions)
        if self._primary.live:
            self._close(self._primary, actions)
        waiting = False
        for u in self._mirrors:
            if not u.live:
                continue
            if outcome == "ok" and not u.eof_received and u.state is _State.OPEN:
                waiting = True  # let it finish its answer within close_grace
            else:
                self._close(u, actions)
        if waiting:
            actions.append(StartTimer(Timer.CLOSE_GRACE, self.limits.close_grace))

    def _check_final_lengths(self, actions: list[Action]) -> None:
        """At a normal end, a compared mirror that already finished must have said as much."""
        for r in self._mirrors:
            if r.compared and r.eof_received and r.out != self._frontier:
                self._diverged(
                    r,
                    f"output length differs: primary {self._frontier} bytes, "
                    f"{r.name} {r.out} bytes",
                    actions,
                )

    def _check_finished(self, actions: list[Action]) -> None:
        if not self._ending or self.finished:
            return
        if not self.client_closed:
            return
        if any(u.state is not _State.CLOSED for u in self._ups.values()):
            return
        self.finished = True
        actions.append(Finished(self.outcome or "ok"))


def _same(a: bytes | bytearray, a_at: int, b: bytes | bytearray, b_at: int, k: int) -> bool:
    """Whether ``a[a_at:a_at+k] == b[b_at:b_at+k]``, without copying either.

    ``startswith`` compares with memcmp; ``==`` between memoryviews goes byte by
    byte in Python's C code (about 2 ms per MiB here, 70 times slower).
    """
    if k <= 0:
        return True
    if b_at == 0 and k == len(b):
        return a.startswith(b, a_at)
    with memoryview(b) as bv, bv[b_at : b_at + k] as part:
        return len(part) == k and a.startswith(part, a_at)


def _excerpt(view: memoryview) -> str:
    chunk = bytes(view[:EXCERPT_BYTES])
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
    more = "..." if len(view) > EXCERPT_BYTES else ""
    return f"{chunk.hex(' ')}{more} |{text}|"


_HANDLERS: dict[type[Event], Callable[[Session, Any, list[Action]], None]] = {
    ClientData: Session._on_client_data,
    ClientEof: Session._on_client_eof,
    ClientClosed: Session._on_client_closed,
    UpstreamConnected: Session._on_connected,
    UpstreamConnectFailed: Session._on_connect_failed,
    UpstreamData: Session._on_upstream_data,
    UpstreamEof: Session._on_upstream_eof,
    UpstreamClosed: Session._on_upstream_closed,
    WriteBlocked: Session._on_write_blocked,
    WriteUnblocked: Session._on_write_unblocked,
    TimerFired: Session._on_timer,
    IdleTimeout: Session._on_idle,
    PromoteResult: Session._on_promote_result,
    PrimaryDown: Session._on_primary_down,
    BackendStale: Session._on_backend_stale,
    Shutdown: Session._on_shutdown,
}
