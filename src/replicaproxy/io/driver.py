"""The uvloop/asyncio side of a session: protocols, transports and timers.

This is the only module that touches sockets on the data path. Protocol
callbacks turn into :mod:`replicaproxy.core.events`; the session's actions are
carried out by :meth:`SessionDriver._do`, which knows every action and raises
on anything else. ``OSError`` is caught here, at the edge, and becomes an event.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import os
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from replicaproxy.config import Address
from replicaproxy.core import postgres
from replicaproxy.core.events import (
    CLIENT,
    Abort,
    Action,
    BackendStale,
    CancelTimer,
    CheckPrimary,
    ClientClosed,
    ClientData,
    ClientEof,
    Close,
    Connect,
    Event,
    Finished,
    IdleTimeout,
    MarkStale,
    OverMemory,
    PauseReading,
    PrimaryChecked,
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
from replicaproxy.core.session import Session
from replicaproxy.logutil import LOCAL_ERRNOS, describe_error
from replicaproxy.tls import ClientTls, agreed_socket

log = logging.getLogger(__name__)

#: How many times per idle_timeout a session checks whether it was idle.
IDLE_CHECKS = 4
#: Connect attempts per upstream per session (see SessionDriver._connect).
CONNECT_TRIES = 3
#: Batched input that is written at once instead of at the tick. Batching saves a
#: system call per small write; past 64 KiB a call is a small part of moving the
#: bytes, and a fast client cannot make a session hold a tick's worth of its stream.
FLUSH_BYTES = 64 * 1024

#: What is read at most, at a reset, of what an upstream sent before it (see
#: SessionDriver._read_rest): a socket's receive buffer at its largest by default.
REST_LIMIT = 6 * 1024 * 1024

#: Seconds a PostgreSQL client has for its TLS handshake after the proxy's ``S``: as
#: long as on a TLS listener (io/handshake.py says why).
HANDSHAKE_TIMEOUT = 10.0


#: Cancelled timers kept in the heap at most, beyond as many as are live (see Timers).
TIMERS_SLACK = 1024
#: Timers due this close to now fire with those due now: uvloop's clock counts
#: milliseconds, so one due 0.2 ms from now would only set the loop's timer again.
TIMERS_RESOLUTION = 0.001


class TimerEntry:
    """One timer of :class:`Timers`; ``cancel()`` it as a handle of the loop's."""

    __slots__ = ("callback", "cancelled", "timers")

    def __init__(self, timers: Timers, callback: Callable[[], object]) -> None:
        self.timers = timers
        self.callback: Callable[[], object] | None = callback
        self.cancelled = False  # (also once it fired)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.callback = None  # a cancelled entry in the heap keeps no session alive
            self.timers.dropped()


class Timers:
    """The timers of every session, on one timer of the event loop.

    A session sets at least three (its idle check, its connect's deadline, the
    linger after it closes) and cancels nearly all of them. A timer of uvloop's costs
    a handle and a libuv timer to set and more work again to cancel: with short
    sessions, as much as a third of what the session's own code took. Here a timer
    is an entry in a heap, the loop's one timer is set for the earliest, and a
    cancelled entry is dropped when it comes up, or all of them at once when they are
    most of the heap.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerEntry]] = []
        self._count = 0  # entries made so far (the heap's tie-breaker)
        self._cancelled = 0  # cancelled entries still in the heap
        self._handle: asyncio.TimerHandle | None = None
        self._armed = math.inf  # when _handle fires
        self._loop: asyncio.AbstractEventLoop | None = None

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerEntry:
        """Call ``callback`` in ``delay`` seconds, as ``loop.call_later`` would."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return self.call_at(loop.time() + delay, callback)

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerEntry:
        """Call ``callback`` at ``when`` (the loop's clock), as ``loop.call_at`` would."""
        entry = TimerEntry(self, callback)
        self._count += 1
        heapq.heappush(self._heap, (when, self._count, entry))
        if when < self._armed:
            self._arm(when)
        return entry

    def dropped(self) -> None:
        """An entry was cancelled; most of the heap cancelled: drop them."""
        self._cancelled += 1
        if self._cancelled > TIMERS_SLACK and self._cancelled * 2 > len(self._heap):
            self._heap = [e for e in self._heap if not e[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._armed = when
        self._handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed = math.inf
        loop = self._loop
        assert loop is not None
        heap = self._heap
        end = loop.time() + TIMERS_RESOLUTION
        last = self._count  # not those set meanwhile: a timer of 0 s fires next time
        while heap and heap[0][0] <= end and heap[0][1] <= last:
            entry = heapq.heappop(heap)[2]
            callback = entry.callback
            if entry.cancelled or callback is None:
                self._cancelled -= 1
                continue
            entry.cancelled = True  # (fired: cancelling it now changes nothing)
            entry.callback = None
            try:
                callback()
            except Exception:  # like a handle of the loop's: logged, the others still fire
                log.exception("timer callback %r failed", callback)
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        if heap and heap[0][0] < self._armed:
            self._arm(heap[0][0])


class SessionHost(Protocol):
    """What a session's driver needs from the server that runs it."""

    def address_of(self, name: str) -> Address: ...
    def tls_of(self, name: str) -> ClientTls | None: ...
    def write_limit(self, name: str) -> int | None: ...
    def memory_of(self, name: str) -> MemoryBudget | None: ...
    def connected(self, name: str, seconds: float) -> None: ...
    def mark_stale(self, name: str, reason: str, sid: int) -> None: ...
    def promote_failed(
        self, old: str, new: str, reason: str, sid: int, kind: str
    ) -> bool | None: ...
    def report(self, kind: str, name: str, detail: str, sid: int) -> None: ...
    def session_finished(self, driver: SessionDriver, outcome: str) -> None: ...
    def check_alive(self, name: str, answer: Callable[[bool, str], None]) -> None: ...
    def cancel(self, key: bytes, peer: str) -> None: ...
    def client_tls(self) -> ssl.SSLContext | None: ...
    def handshake_failed(self, exc: BaseException, peer: str) -> None: ...


def _describe(exc: BaseException | None) -> str | None:
    return None if exc is None else describe_error(exc)


class Flusher:
    """Writes to replicas and shadows in batches, on one shared tick.

    In async mode nothing waits for a replica, so its copy of the input need
    not be written chunk by chunk: gathering a tick's worth and writing it at
    once saves a system call per request and per replica (and wakes the
    replica less often). The tick bounds how far a replica's input lags.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._dirty: set[SessionDriver] = set()
        self._handle: asyncio.TimerHandle | None = None

    def mark(self, driver: SessionDriver) -> None:
        """``driver`` holds input back: flush it on the next tick (once per tick)."""
        self._dirty.add(driver)
        if self._handle is None:
            self._handle = driver.loop.call_later(self.interval, self._tick)

    def forget(self, driver: SessionDriver) -> None:
        self._dirty.discard(driver)

    def _tick(self) -> None:
        self._handle = None
        dirty, self._dirty = self._dirty, set()
        for driver in dirty:
            driver.flush()


class MemoryBudget:
    """The input held in the proxy for one replica or shadow over all its sessions.

    Each session adds what it holds for the backend as it measures it (when a batch is
    written out, on the next tick while a write buffer is not empty, on the server's
    tick, and per chunk only off the hot path, while a replica connects) and takes it
    back when that shrinks or the connection goes: an integer add per measurement,
    nothing per chunk on the hot path. Past ``limit``
    ``over(name)`` is called at once (the event loop may read a great deal more before
    a callback scheduled for later runs), and again only after :meth:`rearm`. It may
    be called from inside a session's flush: the drivers queue what it feeds them
    while they are busy.
    """

    def __init__(self, name: str, limit: int, over: Callable[[str], None]) -> None:
        self.name = name
        self.limit = limit
        #: Bytes held for the backend, over all sessions, as last measured.
        self.held = 0
        self.tripped = False
        self._over = over

    def add(self, n: int) -> None:
        """A session holds ``n`` bytes more for the backend (fewer, when negative)."""
        held = self.held + n
        self.held = held
        if n > 0 and held > self.limit and not self.tripped:
            self.tripped = True
            self._over(self.name)

    def rearm(self) -> None:
        """The backend left its sessions: the next time past ``limit`` counts again."""
        self.tripped = False


class _Share:
    """What one session holds for one backend's :class:`MemoryBudget`, as last measured."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0


class SessionDriver:
    """Carries out one :class:`Session`'s actions on real transports."""

    def __init__(
        self,
        sid: int,
        session: Session,
        host: SessionHost,
        client: asyncio.Transport,
        *,
        connect_timeout: float,
        idle_timeout: float,
        flusher: Flusher | None = None,
        timers: Timers | None = None,
        preamble: bool = False,
        peername: object = None,
    ) -> None:
        self.sid = sid
        self.session = session
        self.host = host
        self.loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        # (The server has asked the transport already: each time is a system call.)
        peer = client.get_extra_info("peername") if peername is None else peername
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._transports: dict[str, asyncio.Transport] = {CLIENT: client}
        self._to_client = (client,)
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._expired: set[str] = set()  # connects whose connect_timeout passed
        self._clock = timers if timers is not None else Timers()
        self._timers: dict[Timer, TimerEntry] = {}
        self._queue: deque[Event] = deque()
        self._dispatching = False
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        # The idle check compares the session's byte counts instead of reading the
        # clock per chunk (IDLE_CHECKS checks per idle_timeout: idle is seen within 1/4).
        self._seen_progress = 0
        self._quiet_since = self.loop.time()
        self._idle_handle: TimerEntry | None = None
        self._done = False  # the host was told the session finished
        self._flusher = flusher
        #: The client's first bytes while they may be for the proxy itself (PostgreSQL's
        #: SSLRequest, GSSENCRequest, CancelRequest); None once the session takes them.
        self.head: bytes | None = b"" if preamble else None
        self._tls_begun = False  # the client's SSLRequest was answered "S"
        self._tls_task: asyncio.Task[None] | None = None  # (held: the loop keeps weak ones)
        self._batched: set[str] = set()  # upstreams whose writes wait for the tick
        self._deferred: dict[str, list[bytes]] = {}  # their input until then
        self._marked = False  # the flusher knows this session holds input back
        self._batch_bytes = 0  # client bytes in the batch (each batched upstream has them)
        # The hot path (see _plan): while the session's route holds, client data
        # is written to _now and queued in _later, and only counted in _in; while
        # the primary's output passes, data from _out_name goes to the client and
        # is counted in _out. settle() gives the session the counts.
        self._now: tuple[asyncio.Transport, ...] | None = None
        self._later: tuple[list[bytes], ...] = ()
        self._in = 0
        self._out_name: str | None = None
        self._out = 0
        self._primary_name: str | None = None  # (None: ask checked() first; it knows)
        self._frames = False  # client bytes go through the session's framer first
        #: The replicas' and shadows' memory budgets, and what this session holds of each.
        self._shares: dict[str, _Share] = {}
        #: A share was charged with a write buffer not yet empty: the next tick measures
        #: it again (it may have gone out since, with nothing more to write).
        self._unmeasured = False

    # ---------------------------------------------------------------- events

    def start(self) -> None:
        """Begin the session: connect the upstreams, arm the idle timer."""
        primary = self.session.primary
        for name in self.session.members:
            budget = self.host.memory_of(name) if name != primary else None
            if budget is not None:
                self._shares[name] = _Share(budget)
        if self._idle_timeout > 0:
            self._idle_handle = self._clock.call_later(
                self._idle_timeout / IDLE_CHECKS, self._check_idle
            )
        self._run(self.session.start())

    def feed(self, event: Event) -> None:
        """Hand ``event`` to the session and carry out what it answers.

        Transports call back synchronously from inside ``write()`` (for
        ``pause_writing``); such events wait in a queue until the current
        action list is done, so the session never sees two events at once.
        """
        if self._dispatching:
            self._queue.append(event)
        else:
            self._dispatch(self.session.handle, event)

    def _dispatch(self, step: Callable[..., list[Action]], *args: object) -> None:
        """Run one step of the session and every event queued meanwhile."""
        self._dispatching = True
        self._unplan()
        try:
            self._run(step(*args))
            self._drain()
        except Exception:
            self._crashed()
        finally:
            self._dispatching = False

    def _drain(self) -> None:
        """Handle the events queued while dispatching, then plan the hot path again."""
        while self._queue:
            self._run(self.session.handle(self._queue.popleft()))
        self._plan()

    def _unplan(self) -> None:
        """Give the session the counts and drop the plan, until ``_plan`` runs again."""
        self.settle()
        self._now = self._out_name = None

    def settle(self) -> None:
        """Tell the session what the hot path moved without it."""
        if self._in:
            self.session.count_input(self._in)
            self._in = 0
        if self._out:
            self.session.count_output(self._out)
            self._out = 0

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            self._do(action)

    def _check_idle(self) -> None:
        now = self.loop.time()
        self.settle()
        progress = self.session.progress()
        if progress != self._seen_progress:
            self._seen_progress = progress
            self._quiet_since = now
        elif now - self._quiet_since >= self._idle_timeout:
            self._idle_handle = None
            log.info("session %d: idle for %.1f s, closing", self.sid, now - self._quiet_since)
            self.feed(IdleTimeout())
            return
        self._idle_handle = self._clock.call_later(
            self._idle_timeout / IDLE_CHECKS, self._check_idle
        )

    def shutdown(self) -> None:
        """The server's grace period is over: end the session now."""
        self.feed(Shutdown())

    def primary_down(self, reason: str) -> None:
        """The health checker declared this session's primary down."""
        self.feed(PrimaryDown(reason))

    def backend_stale(self, name: str, reason: str) -> None:
        """The view says replica ``name`` is stale: it leaves the session."""
        self.feed(BackendStale(name, reason))

    def over_memory(self, name: str, reason: str) -> bool:
        """``name``'s memory budget is spent: it leaves the session (if it is a replica or
        shadow here). Whether it was taking part until now."""
        if name not in self._shares:
            return False  # the session's primary, or not in it at all
        was = self.session.in_session(name)
        self.feed(OverMemory(name, reason))
        return was

    def measure(self, name: str) -> int:
        """Input for ``name`` not yet handed to its socket (held in the session, batched,
        or in the write buffer); its memory budget is brought up to date with it."""
        t = self._transports.get(name)
        held = self.session.held(name) + (t.get_write_buffer_size() if t is not None else 0)
        held += sum(len(c) for c in self._deferred.get(name, ()))
        share = self._shares.get(name)
        if share is not None:  # (a connection that is closing still holds its buffer)
            self._charge(share, held)
        return held

    def _measure_shares(self) -> None:
        """Charge every share with what the session and the write buffer hold for it."""
        s = self.session
        # (A copy: going past a budget makes backends leave, and let go of their share.)
        for name, share in list(self._shares.items()):
            t = self._transports.get(name)
            buffered = t.get_write_buffer_size() if t is not None and not t.is_closing() else 0
            self._charge(share, s.held(name) + buffered)

    def _charge(self, share: _Share, held: int) -> None:
        """This session holds ``held`` bytes for ``share``'s backend now."""
        change = held - share.held
        if change:
            share.held = held
            share.budget.add(change)

    def _release(self, name: str) -> None:
        """Nothing is held for ``name`` in this session any more, nor will be (its
        connection is gone, or cut: a closed transport may still report its old size)."""
        share = self._shares.pop(name, None)
        if share is not None and share.held:
            self._charge(share, 0)

    # --------------------------------------------------------------- actions

    def flush(self, target: str | None = None) -> None:
        """Write out the batched input of ``target`` (of every upstream: None).

        Each backend's memory budget is charged with what its write buffer holds after
        the batch (what the socket did not take): at once, so that a backend that takes
        nothing is seen within a batch per session, however much the event loop reads
        in one round. A buffer left non-empty is measured again on the next tick (it
        may have gone out since, and the session may have nothing more to write); after
        that, the server's tick measures it once a second.
        """
        if target is None:
            self._marked = False
            self._batch_bytes = 0
            names = list(self._deferred)
            if self._unmeasured:
                self._unmeasured = False
                self._measure_shares()
        else:
            names = [target]
        for name in names:
            chunks = self._deferred.get(name)
            if not chunks:
                continue
            batch = chunks.copy()
            chunks.clear()  # the list itself stays: the plan appends to it
            t = self._transports.get(name)
            if t is not None and not t.is_closing():
                t.writelines(batch)
                share = self._shares.get(name)
                if share is not None and not t.is_closing():
                    held = self.session.held(name) + t.get_write_buffer_size()
                    self._charge(share, held)
                    if held:
                        self._unmeasured = True
        if self._unmeasured and not self._marked and self._flusher is not None:
            self._mark()  # (measured again on the next tick: it may have gone out since)

    def preamble(self, data: bytes) -> None:
        """The client's first bytes, while they may be for the proxy itself.

        The proxy cannot mirror an encrypted stream, and a replica must not see a
        request its primary answered (the client sends its StartupMessage after reading
        the answer), so the proxy answers these itself. An SSLRequest gets ``S`` and a
        TLS handshake with the proxy's certificate where ``[proxy] tls_cert`` is set
        (every backend then gets the decrypted stream), else ``N``; then a client that
        does not ask for TLS is refused. A GSSENCRequest gets ``N``. A CancelRequest is
        carried out against every backend, each with its own key.
        """
        head = (self.head or b"") + data
        client = self._transports[CLIENT]
        while True:
            verdict = postgres.preamble(head)
            if verdict == postgres.NEED_MORE:
                self.head = head
                return
            if verdict == postgres.SSL and not self._tls_begun:
                context = self.host.client_tls()
                if context is not None:
                    if len(head) > 8:
                        # Bytes sent before the answer would be taken as if encrypted
                        # (PostgreSQL refuses them too: CVE-2021-23214).
                        self._refuse(b"08P01", "received unencrypted data after SSL request")
                        return
                    self.head = b""
                    self._tls_begun = True
                    if not client.is_closing():
                        client.write(b"S")
                        self._tls_task = self.loop.create_task(self._start_tls(client, context))
                    return
            if verdict in (postgres.SSL, postgres.ANSWER_NO):
                if not client.is_closing():
                    client.write(b"N")
                head = head[8:]
                if not head:
                    self.head = b""
                    return
                continue
            if verdict == postgres.CANCEL:
                self.head = None
                self.host.cancel(head[8:16], self.peer)
                client.close()
                return
            if self.host.client_tls() is not None and not self._tls_begun:
                self.head = None
                self._refuse(b"28000", "this proxy takes TLS connections only (sslmode=require)")
                return
            self.head = None
            self.client_data(head)
            return

    def _refuse(self, sqlstate: bytes, message: str) -> None:
        """End the session before it began, with a FATAL ErrorResponse to the client."""
        self.head = None
        client = self._transports[CLIENT]
        log.info("session %d: refused %s: %s", self.sid, self.peer, message)
        if not client.is_closing():
            client.write(postgres.fatal_response(sqlstate, message))
            client.close()

    async def _start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        """TLS on the client's connection after its SSLRequest was answered ``S``."""
        protocol = raw.get_protocol()
        try:
            tls = await self.loop.start_tls(
                raw, protocol, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.host.handshake_failed(exc, self.peer)
            raw.abort()
            return
        except RuntimeError:  # the connection closed under the handshake
            return
        if tls is None:  # (the connection ended under it)
            return
        self._transports[CLIENT] = tls
        self._to_client = (tls,)
        if isinstance(protocol, ClientProtocol):
            protocol.tls_started(tls)

    def client_data(self, data: bytes) -> None:
        """ClientData: by the plan while the session's route holds, else by the session."""
        now = self._now
        if now is None:
            if self._dispatching:
                self._queue.append(ClientData(data))
            else:
                self._dispatch(self.session.handle, ClientData(data))
                if self._shares:
                    # Off the hot path (a replica still connecting, say): what the session
                    # holds for it counts at once, as a write buffer does.
                    self._measure_shares()
            return
        if self._frames:
            self.session.frame_input(data)
        n = len(data)
        self._in += n
        later = self._later
        if later:  # the batched upstreams: their copy waits for the tick
            for chunks in later:
                chunks.append(data)
            self._batch_bytes += n
            if not self._marked:
                self._mark()
        self._forward(now, data)
        if self._batch_bytes >= FLUSH_BYTES:
            self.flush()

    def upstream_data(self, name: str, data: bytes) -> None:
        """UpstreamData: by the plan while the primary's output passes, else the shortest way.

        That is: passed() for the primary's, checked() for a mirror's, and handle()
        for what they leave.
        """
        if name == self._out_name:
            self._out += len(data)
            self._forward(self._to_client, data)
        elif self._dispatching:
            self._queue.append(UpstreamData(name, data))
        elif name == self._primary_name:
            if self.session.passed(name, data):
                self._forward(self._to_client, data)
            else:
                self._dispatch(self.session.handle, UpstreamData(name, data))
        elif not self.session.checked(name, data):
            self._dispatch(self.session.handle, UpstreamData(name, data))

    def _plan(self) -> None:
        """Ask the session which ways hold until its next event, and prepare them.

        Run after every step of the session. A transport the loop closed by itself
        since stays in the plan until its ``connection_lost`` arrives; ``_forward``
        skips it.
        """
        s = self.session
        route = s.route()
        if route is None:
            self._now = None
        else:
            now: list[asyncio.Transport] = []
            later: list[list[bytes]] = []
            for name in route:
                if name in self._batched:
                    later.append(self._deferred.setdefault(name, []))
                else:
                    t = self._transports.get(name)
                    if t is not None and not t.is_closing():
                        now.append(t)
            self._now = tuple(now)
            self._later = tuple(later)
            self._frames = s.frames_input()
        self._primary_name = s.primary
        self._out_name = self._primary_name if s.passes() else None

    def _forward(self, targets: tuple[asyncio.Transport, ...], data: bytes) -> None:
        """Write data the session routed, then handle what the writes reported.

        (``_dispatch`` with a step that writes would do the same; measured side by
        side under redis-benchmark, that costs a replicating proxy several percent
        more CPU per request.)
        """
        self._dispatching = True  # a write may report WriteBlocked: it waits its turn
        try:
            for t in targets:
                try:
                    t.write(data)
                except RuntimeError:
                    if not t.is_closing():  # closed by the loop; connection_lost follows
                        raise
            if self._queue:
                self._written()
        except Exception:
            self._crashed()
        finally:
            self._dispatching = False

    def _written(self) -> None:
        """Handle what the writes reported (they waited in the queue)."""
        self._unplan()
        self._drain()

    def _crashed(self) -> None:
        # A bug, not a peer's fault: say so loudly, then don't leave sockets behind.
        log.exception("session %d: internal error; closing the session", self.sid)
        self._teardown("internal_error")

    def _mark(self) -> None:
        """Have the flusher write this session's batch on its next tick."""
        self._marked = True
        assert self._flusher is not None
        self._flusher.mark(self)

    def _write(self, target: str, data: bytes) -> None:
        if target in self._batched:
            self._deferred.setdefault(target, []).append(data)
            self._batch_bytes += len(data)  # (for each batched target: a bound, not a size)
            if self._batch_bytes >= FLUSH_BYTES:
                # (as on the hot path: input held while it connected may be megabytes)
                self.flush()
            elif not self._marked:
                self._mark()
            return
        t = self._transports.get(target)
        if t is not None and not t.is_closing():
            t.write(data)

    def _do(self, action: Action) -> None:
        if type(action) is WriteAll:
            data = action.data
            for target in action.targets:
                self._write(target, data)
        elif type(action) is Write:
            self._write(action.target, action.data)
        elif isinstance(action, PauseReading):
            t = self._transports.get(action.target)
            if t is not None and not t.is_closing():
                t.pause_reading()
        elif isinstance(action, ResumeReading):
            t = self._transports.get(action.target)
            if t is not None and not t.is_closing():
                t.resume_reading()
        elif isinstance(action, Connect):
            self._start_connect(action.name)
        elif isinstance(action, WriteEof):
            self.flush(action.target)
            t = self._transports.get(action.target)
            if t is not None and not t.is_closing() and t.can_write_eof():
                t.write_eof()
        elif isinstance(action, Close):
            self.flush(action.target)
            t = self._transports.get(action.target)
            if t is not None:
                t.close()
        elif isinstance(action, Abort):
            dropped = self._deferred.pop(action.target, None)
            if dropped:
                dropped.clear()
            self._batched.discard(action.target)
            self._abort(action.target)
            self._release(action.target)  # (an abort drops the write buffer)
        elif isinstance(action, StartTimer):
            self._start_timer(action.timer, action.delay)
        elif isinstance(action, CancelTimer):
            handle = self._timers.pop(action.timer, None)
            if handle is not None:
                handle.cancel()
        elif isinstance(action, MarkStale):
            self.host.mark_stale(action.name, action.reason, self.sid)
        elif isinstance(action, Promote):
            self.flush(action.name)  # a primary's input is never held back
            self._batched.discard(action.name)
            self._release(action.name)  # nor counted against a budget
            t = self._transports.get(action.name)
            if t is not None:
                t.set_write_buffer_limits()  # a primary's limits: it sets the client's pace
            ok = self.host.promote_failed(
                action.old, action.name, action.reason, self.sid, action.kind
            )
            if ok is not None:  # None: the host feeds PromoteResult once it knows
                self.feed(PromoteResult(action.name, ok))
        elif isinstance(action, Report):
            self.host.report(action.kind, action.name, action.detail, self.sid)
        elif isinstance(action, CheckPrimary):
            name = action.name
            self.host.check_alive(
                name, lambda alive, reason: self.feed(PrimaryChecked(name, alive, reason))
            )
        elif isinstance(action, Finished):
            self._finish(action.outcome)
        else:
            raise TypeError(f"unknown action {action!r}")

    # (Closures are made here, not in _do: a function that makes one gets an
    # environment object on every call, and _do is called for every action.)

    def _start_connect(self, name: str) -> None:
        task = self.loop.create_task(self._connect(name))
        task.add_done_callback(lambda t: self._connect_done(name, t))
        self._connecting[name] = task

    def _start_timer(self, timer: Timer, delay: float) -> None:
        old = self._timers.pop(timer, None)
        if old is not None:
            old.cancel()
        fired = TimerFired(timer)
        self._timers[timer] = self._clock.call_later(delay, lambda: self.feed(fired))

    def _abort(self, target: str) -> None:
        t = self._transports.get(target)
        if t is not None:
            t.abort()  # connection_lost reports UpstreamClosed
        task = self._connecting.get(target)
        if task is not None and not task.done():
            task.cancel()  # without a transport yet, _connect reports UpstreamClosed

    async def _connect(self, name: str) -> None:
        """Connect to ``name``, retrying a refused connect briefly within connect_timeout.

        A backend restarting, or a full accept queue, refuses for a moment; a
        dead one keeps refusing. Three tries 50 and 100 ms apart tell them apart
        without delaying a failover by more than that. A backend with TLS is connected
        when its handshake is done, within the same connect_timeout; a failed handshake
        (a certificate that fails verification) is not retried: it would fail again.
        """
        address = self.host.address_of(name)
        tls = self.host.tls_of(name)
        began = self.loop.time()
        deadline = began + self._connect_timeout
        delay = 0.05
        for attempt in range(1, CONNECT_TRIES + 1):
            try:
                transport = await self._try_connect(name, address, tls, deadline)
                break
            except TimeoutError:
                reason = f"no answer within {self._connect_timeout} s"
            except OSError as exc:
                reason = describe_error(exc)
                if exc.errno in LOCAL_ERRNOS:
                    self._release(name)
                    self.feed(UpstreamConnectFailed(name, reason, local=True))
                    return
                if (
                    not isinstance(exc, ssl.SSLError)
                    and attempt < CONNECT_TRIES
                    and self.loop.time() + delay < deadline
                ):
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
            self._release(name)  # (input held for it in the session is dropped)
            self.feed(UpstreamConnectFailed(name, reason))
            return
        else:  # pragma: no cover - the loop always breaks or returns
            return
        self.host.connected(name, self.loop.time() - began)
        limit = self.host.write_limit(name)
        if limit is not None:
            transport.set_write_buffer_limits(high=limit, low=limit // 2)
            if self._flusher is not None:
                self._batched.add(name)
        self.feed(UpstreamConnected(name))

    async def _try_connect(
        self, name: str, address: Address, tls: ClientTls | None, deadline: float
    ) -> asyncio.Transport:
        """One try at connecting ``name``; TimeoutError at ``deadline``.

        (What ``asyncio.timeout_at`` does, with a bare timer: a short session's connect
        is a good part of its cost, and that context manager is Python code.)
        """
        expiry = self._clock.call_at(deadline, lambda: self._connect_expired(name))
        try:
            if tls is None:
                transport, _ = await self.loop.create_connection(
                    lambda: UpstreamProtocol(self, name), address.host, address.port
                )
            elif tls.preface:  # (PostgreSQL: TLS once it agreed to it)
                sock = await agreed_socket(address.host, address.port, tls.preface)
                transport, _ = await self.loop.create_connection(
                    lambda: UpstreamProtocol(self, name, half_close=False),
                    sock=sock,
                    ssl=tls.context,
                    server_hostname=tls.server_name,
                )
            else:
                transport, _ = await self.loop.create_connection(
                    lambda: UpstreamProtocol(self, name, half_close=False),
                    address.host,
                    address.port,
                    ssl=tls.context,
                    server_hostname=tls.server_name,
                )
        except asyncio.CancelledError:
            task = self._connecting.get(name)
            # Cancelled by the timer alone (not by an Abort as well): the time is up.
            if name in self._expired and task is not None and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            expiry.cancel()
            self._expired.discard(name)
        return transport

    def _connect_expired(self, name: str) -> None:
        """connect_timeout passed while ``name`` was connecting."""
        task = self._connecting.get(name)
        if task is not None and not task.done():
            self._expired.add(name)
            task.cancel()

    def _connect_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._connecting.pop(name, None)
        # Cancelled by an Abort (possibly before it even started, or after the
        # transport appeared but before the connect finished): connection_lost may
        # never come, so say it is closed here. A later one is ignored by the session.
        if task.cancelled():
            t = self._transports.get(name)
            if t is not None:
                t.abort()
            self._release(name)
            self.feed(UpstreamClosed(name, None))

    def _finish(self, outcome: str) -> None:
        if self._flusher is not None:
            self._flusher.forget(self)
        for name in list(self._shares):
            self._release(name)
        self._marked = True  # nothing is held back any more, nor will be
        self._batch_bytes = 0
        for chunks in self._deferred.values():
            chunks.clear()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if not self._done:
            self._done = True
            self.host.session_finished(self, outcome)

    def _teardown(self, outcome: str) -> None:
        """Last resort after a bug: abort every connection, end the session."""
        self._unplan()
        for task in list(self._connecting.values()):
            task.cancel()
        for t in self._transports.values():
            t.abort()
        self._finish(outcome)

    # ------------------------------------------------- called by the protocols

    def attach(self, name: str, transport: asyncio.Transport) -> None:
        self._transports[name] = transport

    def lost(self, name: str, exc: Exception | None) -> None:
        """``name``'s connection is gone, and what its write buffer held with it."""
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            self._read_rest(name)
        self._release(name)
        self.feed(UpstreamClosed(name, _describe(exc)))

    def _read_rest(self, name: str) -> None:
        """Hand on what ``name`` sent before it reset the connection, still unread.

        A server that answers a bad request with an error and closes while input is
        still coming resets the connection. When the next write to it fails on that
        reset, the loop stops reading at once, and the answer it had sent waits in the
        socket: a client of the server's own would still read it after its failed
        write (Redis's protocol error is such an answer). The socket is open until
        this returns; TLS connections are left alone (their bytes are records).
        """
        t = self._transports.get(name)
        if t is None or self.host.tls_of(name) is not None:
            return
        sock = t.get_extra_info("socket")
        try:
            fd = sock.fileno() if sock is not None else -1
        except OSError:
            return
        rest = bytearray()
        while fd >= 0 and len(rest) < REST_LIMIT:
            try:
                chunk = os.read(fd, min(256 * 1024, REST_LIMIT - len(rest)))
            except OSError:  # (nothing more waits, or the reset itself)
                break
            if not chunk:
                break
            rest += chunk
        if rest:
            self.upstream_data(name, bytes(rest))


class ClientProtocol(asyncio.Protocol):
    """The client side of a session. ``on_made`` builds the session's driver.

    ``half_close``: whether the connection stays open, half-closed, after the client's
    end of input. Not over TLS: asyncio's TLS (uvloop's too) ends the whole connection
    at the peer's close_notify whatever the protocol answers, and warns when told to
    keep it open.
    """

    def __init__(
        self,
        on_made: Callable[[asyncio.Transport], SessionDriver | None],
        half_close: bool = True,
    ) -> None:
        self._on_made = on_made
        self.driver: SessionDriver | None = None
        self._keep_open = half_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.driver = self._on_made(cast(asyncio.Transport, transport))

    def tls_started(self, transport: asyncio.Transport) -> None:
        """The connection now speaks TLS (PostgreSQL's SSLRequest): no half-close."""
        self._keep_open = False

    def data_received(self, data: bytes) -> None:
        d = self.driver
        if d is not None:
            if d.head is None:
                d.client_data(data)
            else:
                d.preamble(data)

    def eof_received(self) -> bool:
        if self.driver is not None:
            self.driver.feed(ClientEof())
        return self._keep_open  # keep the connection half-open: the client may still read

    def connection_lost(self, exc: Exception | None) -> None:
        if self.driver is not None:
            self.driver.feed(ClientClosed(_describe(exc)))

    def pause_writing(self) -> None:
        if self.driver is not None:
            self.driver.feed(WriteBlocked(CLIENT))

    def resume_writing(self) -> None:
        if self.driver is not None:
            self.driver.feed(WriteUnblocked(CLIENT))


class UpstreamProtocol(asyncio.Protocol):
    """One upstream connection of a session (``half_close``: as for ClientProtocol)."""

    __slots__ = ("_keep_open", "driver", "name")

    def __init__(self, driver: SessionDriver, name: str, half_close: bool = True) -> None:
        self.driver = driver
        self.name = name
        self._keep_open = half_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.driver.attach(self.name, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.driver.upstream_data(self.name, data)

    def eof_received(self) -> bool:
        self.driver.feed(UpstreamEof(self.name))
        return self._keep_open  # we may still have input to send it

    def connection_lost(self, exc: Exception | None) -> None:
        self.driver.lost(self.name, exc)

    def pause_writing(self) -> None:
        self.driver.feed(WriteBlocked(self.name))

    def resume_writing(self) -> None:
        self.driver.feed(WriteUnblocked(self.name))
