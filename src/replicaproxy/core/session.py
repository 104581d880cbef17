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
  client. In async mode ``delivered == out[primary]``.
* Each replica's and shadow's output is compared with the primary's at equal
  offsets. The primary's output is kept only as far back as the slowest
  compared upstream needs it, and never more than ``compare_window`` bytes;
  an upstream that is ahead of the primary keeps its extra bytes, also at most
  ``compare_window`` before its reading is paused.
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

    def __init__(self, members: Sequence[Member], limits: Limits | None = None) -> None:
        primaries = [m for m in members if m.role == "primary"]
        if len(primaries) != 1:
            raise ValueError(f"a session needs exactly one primary, got {len(primaries)}")
        names = [m.name for m in members]
        if len(set(names)) != len(names) or CLIENT in names:
            raise ValueError(f"member names must be distinct: {names}")
        self.limits = limits or Limits()
        self._ups: dict[str, _Upstream] = {m.name: _Upstream(m) for m in members}
        self._primary = self._ups[primaries[0].name]
        # Upstreams that still get input, primary first (the order of writes).
        self._feeding: list[_Upstream] = [self._primary] + [
            u for u in self._ups.values() if u is not self._primary
        ]
        self._mirrors: list[_Upstream] = self._feeding[1:]  # compared with the primary
        self._gate_open = False  # input flows once the primary is connected
        self._client_pause: set[str] = set()
        self._primary_read_paused = False
        self.received = 0  # bytes read from the client
        self.delivered = 0  # bytes written to the client
        self._window = bytearray()  # primary output from _window_base to out[primary]
        self._window_base = 0
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

    def _on_client_data(self, event: ClientData, actions: list[Action]) -> None:
        data = event.data
        if self.client_eof or self._ending:
            return  # nothing may follow EOF; after the end, input goes nowhere
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
        self._forget(u, actions)
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
            actions.append(Promote(r.name, f"primary unreachable: {self._primary_lost}"))
            return
        self._refuse(actions)

    def _refuse(self, actions: list[Action]) -> None:
        for m in self._feeding:
            self._abort(m, actions)
        self._end("refused", actions)

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
        self._primary = r
        self.promoted = r.name
        if old in self._feeding:
            self._feeding.remove(old)
        if r.state is _State.OPEN:
            self._open_gate(actions)

    def _open_gate(self, actions: list[Action]) -> None:
        self._gate_open = True
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
        actions.append(Report("dropped", p.name, f"marked down: {event.reason}"))
        self._end("primary_down", actions)

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
        n = len(data)
        p.out = start + n
        if not self._client_closing and not self.client_closed:
            actions.append(Write(CLIENT, data))
            self.delivered += n
        behind = False
        for r in self._mirrors:
            if not r.compared:
                continue
            if r.out > start:
                k = min(n, r.out - start)
                if not self._compare(r, start, data, 0, r.ahead, 0, k, actions):
                    continue
                del r.ahead[:k]
                if r.read_paused and len(r.ahead) <= self.limits.compare_window // 2:
                    r.read_paused = False
                    actions.append(ResumeReading(r.name))
            if r.out < p.out:
                behind = True
        if behind:
            if not self._window:
                self._window_base = start
            self._window += data
            self._trim_window(actions)
        else:
            self._window.clear()
            self._window_base = p.out

    def _mirror_output(self, r: _Upstream, data: bytes, actions: list[Action]) -> None:
        start = r.out
        n = len(data)
        r.out = start + n
        p_out = self._primary.out
        k = 0
        if start < p_out:
            k = min(n, p_out - start)
            if not self._compare(
                r, start, self._window, start - self._window_base, data, 0, k, actions
            ):
                return
            self._trim_window(actions)
        if k < n:
            r.ahead += data[k:] if k else data
            if not r.read_paused and len(r.ahead) > self.limits.compare_window:
                r.read_paused = True
                actions.append(PauseReading(r.name))

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
        with memoryview(primary) as pfull, memoryview(mirror) as mfull:
            pv = pfull[p_at : p_at + k]
            mv = mfull[m_at : m_at + k]
            if pv == mv:
                return True
            i = next(i for i in range(k) if pv[i] != mv[i])
            detail = (
                f"output differs at offset {offset + i}: primary {_excerpt(pv[i:])}, "
                f"{r.name} {_excerpt(mv[i:])}"
            )
            pv.release()
            mv.release()
        self._diverged(r, detail, actions)
        return False

    def _diverged(self, r: _Upstream, detail: str, actions: list[Action]) -> None:
        r.matched = False
        self._stop_comparing(r, actions)
        actions.append(Report("divergence", r.name, detail))

    def _stop_comparing(self, r: _Upstream, actions: list[Action]) -> None:
        r.compared = False
        r.ahead = bytearray()
        if r.read_paused:
            r.read_paused = False
            actions.append(ResumeReading(r.name))
        self._trim_window(actions)

    def _trim_window(self, actions: list[Action]) -> None:
        """Drop primary output that no compared upstream still needs."""
        p_out = self._primary.out
        while True:
            need = p_out
            for r in self._mirrors:
                if r.compared and r.out < need:
                    need = r.out
            if need >= p_out:
                self._window.clear()
                self._window_base = p_out
                return
            if p_out - need <= self.limits.compare_window:
                break
            for r in self._mirrors:
                if r.compared and r.out == need:
                    r.compared = False
                    actions.append(
                        Report(
                            "compare_lost",
                            r.name,
                            f"output more than {self.limits.compare_window} bytes behind "
                            f"the primary's (at {r.out} of {p_out})",
                        )
                    )
        drop = need - self._window_base
        if drop > 0:
            del self._window[:drop]
            self._window_base = need

    def _on_upstream_eof(self, event: UpstreamEof, actions: list[Action]) -> None:
        u = self._ups[event.name]
        if u.eof_received or not u.live:
            return
        u.eof_received = True
        if u is self._primary:
            if not self._client_closing and not self.client_closed:
                actions.append(WriteEof(CLIENT))
            self._maybe_end(actions)
        elif self._ending:
            self._close(u, actions)

    def _on_upstream_closed(self, event: UpstreamClosed, actions: list[Action]) -> None:
        u = self._ups[event.name]
        was = u.state
        u.state = _State.CLOSED
        self._forget(u, actions)
        if was is _State.CLOSING:
            # An error while closing may have cost the replica its last input,
            # unless it had already finished on its own.
            if event.error and u.role == "replica" and not u.eof_received:
                actions.append(MarkStale(u.name, f"connection lost: {event.error}"))
            return
        if was is _State.CLOSED:
            return
        reason = event.error or "closed by the backend"
        if u is self._primary:
            self._end("primary_failed", actions)
        else:
            actions.append(Report("dropped", u.name, f"connection lost: {reason}"))
            if u.role == "replica":
                actions.append(MarkStale(u.name, f"connection lost mid-session: {reason}"))

    def _on_write_blocked(self, event: WriteBlocked, actions: list[Action]) -> None:
        target = event.target
        if target == CLIENT:
            # The client reads slower than the primary answers: stop reading the primary.
            if not self._primary_read_paused and self._primary.state is _State.OPEN:
                self._primary_read_paused = True
                actions.append(PauseReading(self._primary.name))
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
            if self._primary_read_paused and self._primary.state is _State.OPEN:
                self._primary_read_paused = False
                actions.append(ResumeReading(self._primary.name))
            return
        if self._ups[target] is self._primary:
            self._resume_client("primary", actions)

    def _on_timer(self, event: TimerFired, actions: list[Action]) -> None:
        if event.timer is Timer.CLOSE_GRACE:
            for u in self._ups.values():
                if u.live:
                    self._close(u, actions)
        elif event.timer is Timer.LINGER:
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

    def _forget(self, u: _Upstream, actions: list[Action]) -> None:
        """Take ``u`` out of the input stream and the comparisons."""
        if u in self._feeding:
            self._feeding.remove(u)
        u.held.clear()
        u.held_size = 0
        if u.compared:
            u.compared = False
            u.ahead = bytearray()
            self._trim_window(actions)

    def _drop(self, u: _Upstream, reason: str, actions: list[Action]) -> None:
        """Remove a replica or shadow from the session at once (it fell behind)."""
        self._abort(u, actions)
        self._forget(u, actions)
        actions.append(Report("dropped", u.name, reason))
        if u.role == "replica":
            actions.append(MarkStale(u.name, reason))

    def _abort(self, u: _Upstream, actions: list[Action]) -> None:
        if u.live:
            u.state = _State.CLOSING
            actions.append(Abort(u.name))

    def _close(self, u: _Upstream, actions: list[Action]) -> None:
        if u.state is _State.OPEN:
            u.state = _State.CLOSING
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
        if self.client_eof and self._primary.eof_received and not self._ending:
            self._end("ok", actions)

    def _end(self, outcome: str, actions: list[Action]) -> None:
        """Wind the session down; the client's input reaches every upstream first."""
        if self._ending:
            return
        self._ending = True
        if self.outcome is None:
            self.outcome = outcome
        if outcome == "ok":
            self._check_final_lengths(actions)
        if not self.client_closed and not self._client_closing:
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
        p_out = self._primary.out
        for r in self._mirrors:
            if r.compared and r.eof_received and r.out != p_out:
                self._diverged(
                    r,
                    f"output length differs: primary {p_out} bytes, {r.name} {r.out} bytes",
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
    Shutdown: Session._on_shutdown,
}
