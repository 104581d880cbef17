"""The proxy's lifecycle: listener, sessions, backend states, shutdown.

``Server(config)`` owns everything that lives longer than one session. It
builds a :class:`~replicaproxy.core.session.Session` for each accepted client
and hands it to a :class:`~replicaproxy.io.driver.SessionDriver`; it never
reaches into a session, it only hears what sessions report.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import time
from dataclasses import dataclass, field

from replicaproxy.config import Address, BackendConfig, Config
from replicaproxy.core.session import Limits, Member, Session
from replicaproxy.io.driver import ClientProtocol, SessionDriver
from replicaproxy.logutil import RateLimited
from replicaproxy.metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("replicaproxy.access")


@dataclass(slots=True)
class Backend:
    """A backend as the server sees it across sessions."""

    config: BackendConfig
    in_sync: bool = True
    sessions: int = 0
    stale_reason: str = ""
    divergences: int = field(default=0)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def role(self) -> str:
        return self.config.role


class Server:
    """Runs the proxy described by ``config`` until asked to stop."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.backends: dict[str, Backend] = {b.name: Backend(b) for b in config.backends}
        self.primary = config.primary.name
        self.sessions: set[SessionDriver] = set()
        self.started = asyncio.Event()
        self.bound: Address | None = None
        self._ids = itertools.count(1)
        self._limits = Limits(
            replica_buffer=config.proxy.replica_buffer,
            close_grace=config.proxy.close_grace,
            # A healthy backend takes its last bytes within a few round trips;
            # twice the connect timeout is already generous for that.
            linger=max(1.0, 2 * config.proxy.connect_timeout),
        )
        self._listener: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ratelimit = RateLimited()
        for b in self.backends.values():
            self.metrics.backend_in_sync.labels(b.name).set(1)

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind the listener; ``started`` is set and the address logged once ready."""
        loop = asyncio.get_running_loop()
        listen = self.config.proxy.listen
        self._listener = await loop.create_server(
            lambda: ClientProtocol(self._accept),
            listen.host,
            listen.port,
            reuse_address=True,
            backlog=1024,
        )
        sock = self._listener.sockets[0].getsockname()
        self.bound = Address(str(sock[0]), int(sock[1]))
        log.info(
            "listening on %s (primary %s, %s mode)",
            self.bound,
            self.primary,
            self.config.proxy.mode,
        )
        self.started.set()

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Start, run until SIGTERM/SIGINT (or :meth:`request_shutdown`), then drain."""
        with self._capture_signals(handle_signals):
            await self.start()
            await self._stop.wait()
            await self.shutdown()

    def request_shutdown(self) -> None:
        """Begin an orderly stop; a second request forces it."""
        if self._stop.is_set():
            log.warning("second stop request: closing every session now")
            self._force.set()
        self._stop.set()

    async def shutdown(self) -> None:
        """Stop accepting, let sessions finish for ``shutdown_grace``, then end them."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        grace = self.config.proxy.shutdown_grace
        if self.sessions:
            log.info(
                "stopping: waiting up to %.1f s for %d sessions to finish",
                grace,
                len(self.sessions),
            )
            await self._wait_idle(grace)
        if self.sessions:
            log.info("stopping: closing %d sessions still open", len(self.sessions))
            for driver in list(self.sessions):
                driver.shutdown()
            await self._wait_idle(self._limits.linger + 1.0)
        log.info("stopped")

    async def _wait_idle(self, limit: float) -> None:
        idle = asyncio.ensure_future(self._idle.wait())
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait({idle, force}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            force.cancel()

    @contextlib.contextmanager
    def _capture_signals(self, enabled: bool):  # type: ignore[no-untyped-def]
        if not enabled:
            yield
            return
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self.request_shutdown)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    # -------------------------------------------------------------- sessions

    def _accept(self, transport: asyncio.Transport) -> SessionDriver | None:
        peer = transport.get_extra_info("peername")
        if self._stop.is_set():
            transport.abort()
            return None
        if len(self.sessions) >= self.config.proxy.max_connections:
            self.metrics.refused.labels("max_connections").inc()
            self._ratelimit.log(
                log,
                logging.WARNING,
                "max_connections",
                "refused %s: max_connections (%d) reached",
                peer,
                self.config.proxy.max_connections,
            )
            transport.abort()
            return None
        members = [Member(self.primary, "primary")]
        for b in self.backends.values():
            if b.name == self.primary:
                continue
            if b.role == "replica" and b.in_sync:
                members.append(Member(b.name, "replica"))
            elif b.role == "shadow":
                members.append(Member(b.name, "shadow"))
        sid = next(self._ids)
        driver = SessionDriver(
            sid,
            Session(members, self._limits),
            self,
            transport,
            connect_timeout=self.config.proxy.connect_timeout,
            idle_timeout=self.config.proxy.idle_timeout,
        )
        self.sessions.add(driver)
        self._idle.clear()
        self.metrics.sessions.inc()
        self.metrics.sessions_active.inc()
        for m in members:
            self.backends[m.name].sessions += 1
        driver.start()
        return driver

    # ---------------------------------------- SessionHost: called by drivers

    def address_of(self, name: str) -> Address:
        return self.backends[name].config.address

    def write_limit(self, name: str) -> int | None:
        """Replicas and shadows may hold ``replica_buffer`` bytes; the primary the default."""
        if self.backends[name].role == "primary" and name == self.primary:
            return None
        return self.config.proxy.replica_buffer

    def mark_stale(self, name: str, reason: str, sid: int) -> None:
        b = self.backends[name]
        if b.in_sync:
            b.in_sync = False
            b.stale_reason = reason
            self.metrics.backend_in_sync.labels(name).set(0)
            log.warning("session %d: replica %s is now stale: %s", sid, name, reason)

    def report(self, kind: str, name: str, detail: str, sid: int) -> None:
        if kind == "divergence":
            self.backends[name].divergences += 1
            self.metrics.divergences.labels(name).inc()
            self._ratelimit.log(
                log, logging.WARNING, f"divergence:{name}", "session %d: %s: %s", sid, name, detail
            )
        elif kind == "connect_failed":
            self.metrics.connect_failures.labels(name).inc()
            self._ratelimit.log(
                log,
                logging.WARNING,
                f"connect:{name}",
                "session %d: cannot connect to %s (%s): %s",
                sid,
                name,
                self.backends[name].config.address,
                detail,
            )
        elif kind == "dropped":
            self.metrics.dropped.labels(name).inc()
            log.warning("session %d: %s left the session: %s", sid, name, detail)
        else:
            log.info("session %d: %s %s: %s", sid, kind, name, detail)

    def session_finished(self, driver: SessionDriver, outcome: str) -> None:
        self.sessions.discard(driver)
        if not self.sessions:
            self._idle.set()
        self.metrics.sessions_active.dec()
        s = driver.session
        for name in s.members:
            self.backends[name].sessions -= 1
            self.metrics.bytes.labels(name, "to_backend").inc(s.fed(name) - s.held(name))
            self.metrics.bytes.labels(name, "from_backend").inc(s.out(name))
        self.metrics.client_bytes.labels("from_client").inc(s.received)
        self.metrics.client_bytes.labels("to_client").inc(s.delivered)
        access_log.info(
            "session %d client=%s duration=%.3fs from_client=%d to_client=%d backends=%s "
            "outcome=%s",
            driver.sid,
            driver.peer,
            time.monotonic() - driver.started,
            s.received,
            s.delivered,
            ",".join(s.members),
            outcome,
        )
