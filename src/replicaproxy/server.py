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
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from replicaproxy.config import Address, BackendConfig, Config
from replicaproxy.control import ControlError
from replicaproxy.core.session import Limits, Member, Session
from replicaproxy.core.view import IllegalTransition, View
from replicaproxy.health import Health, HealthChecker
from replicaproxy.io.driver import ClientProtocol, SessionDriver
from replicaproxy.logutil import RateLimited
from replicaproxy.metrics import Metrics
from replicaproxy.store import FileStateStore, StateError, StateStore

log = logging.getLogger(__name__)


class StartError(Exception):
    """The proxy cannot start (an address in use, say); the message says what and why."""


access_log = logging.getLogger("replicaproxy.access")


@dataclass(slots=True)
class Backend:
    """A backend as the server sees it across sessions (its sync state is in the view)."""

    config: BackendConfig
    sessions: int = 0
    divergences: int = field(default=0)

    @property
    def name(self) -> str:
        return self.config.name


class Server:
    """Runs the proxy described by ``config`` until asked to stop."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        *,
        store: StateStore | None = None,
        reset_state: bool = False,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.backends: dict[str, Backend] = {b.name: Backend(b) for b in config.backends}
        self.store: StateStore = store or FileStateStore(config.proxy.state_file)
        self._reset_state = reset_state
        # Until start() reads the state file: the config's own view.
        self.view = View.new(config.primary.name, self._promotable())
        self.sessions: set[SessionDriver] = set()
        self.started = asyncio.Event()
        self.bound: Address | None = None
        self.admin_bound: Address | None = None
        self._ids = itertools.count(1)
        self._limits = Limits(
            replica_buffer=config.proxy.replica_buffer,
            close_grace=config.proxy.close_grace,
            # A healthy backend takes its last bytes within a few round trips;
            # twice the connect timeout is already generous for that.
            linger=max(1.0, 2 * config.proxy.connect_timeout),
            mode=config.proxy.mode,
            replica_timeout=config.proxy.replica_timeout,
            min_in_sync=config.proxy.min_in_sync,
            divergence_stale=config.proxy.divergence == "stale",
        )
        self.health = HealthChecker(
            config.health,
            {b.name: b.config.address for b in self.backends.values()},
            self._health_changed,
        )
        self._admin: Any = None
        self._running = False  # the state file says a proxy runs on this view
        self._listener: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ratelimit = RateLimited()

    def _promotable(self) -> list[str]:
        """Replicas in config order (shadows are never in the view)."""
        return [b.name for b in self.config.backends if b.role == "replica"]

    def role_of(self, name: str) -> str:
        if name == self.view.primary:
            return "primary"
        return "shadow" if self.backends[name].config.role == "shadow" else "replica"

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Read the view, bind the listener, start health checks and the admin API.

        ``started`` is set and ``listening on HOST:PORT`` logged once clients can come.
        Raises StateError when the state file cannot be used.
        """
        self._load_view()
        loop = asyncio.get_running_loop()
        listen = self.config.proxy.listen
        try:
            self._listener = await loop.create_server(
                lambda: ClientProtocol(self._accept),
                listen.host,
                listen.port,
                reuse_address=True,
                backlog=1024,
            )
        except OSError as exc:
            raise StartError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        sock = self._listener.sockets[0].getsockname()
        self.bound = Address(str(sock[0]), int(sock[1]))
        self.health.start()
        if self.config.admin.listen is not None:
            from replicaproxy.admin.app import AdminServer

            admin = self.config.admin.listen
            self._admin = AdminServer(self, admin, token=self.config.admin.token)
            try:
                self.admin_bound = await self._admin.start()
            except OSError as exc:
                self._admin = None
                raise StartError(
                    f"cannot listen on {admin} (admin API): {exc.strerror or exc}"
                ) from None
        log.info(
            "listening on %s (primary %s, %s mode, epoch %d)",
            self.bound,
            self.view.primary,
            self.config.proxy.mode,
            self.view.epoch,
        )
        self.started.set()

    def _load_view(self) -> None:
        """Take the persisted view over the config's primary (DESIGN.md "State")."""
        stored = self.store.load()
        configured = self._promotable()
        primary = self.config.primary.name
        if stored is None or self._reset_state:
            view = View.new(primary, configured)
            if stored is not None:
                view = View(stored.epoch + 1, view.primary, view.backends)
                log.warning(
                    "--reset-state: starting from the config (primary %s, every replica in "
                    "sync), epoch %d",
                    primary,
                    view.epoch,
                )
            self._store(None if stored is None else stored.epoch, view.with_clean(False))
            self.view = view.with_clean(False)
            self._running = True
        else:
            try:
                view, notes = stored.reconcile(primary, [primary, *configured])
            except IllegalTransition as exc:
                raise StateError(f"{self.config.proxy.state_file}: {exc}") from None
            if view.primary != primary:
                log.warning(
                    "the state file's view (epoch %d) names %s as primary, not the config's "
                    "%s: using the state file",
                    view.epoch,
                    view.primary,
                    primary,
                )
            for note in notes:
                log.warning("state file: %s", note)
            if not stored.clean:
                # The last proxy died without flushing: input it had accepted may
                # never have reached some replicas. None can be trusted now.
                for r in view.replicas():
                    view = view.mark_stale(r)
                log.error(
                    "the last run of the proxy did not stop cleanly: every replica is "
                    "stale until an operator marks it synced (replicaproxy ctl mark-synced)"
                )
            self._store(stored.epoch, view.with_clean(False))
            self.view = view.with_clean(False)
            self._running = True
        self._publish_view()

    def _store(self, old_epoch: int | None, view: View) -> None:
        if not self.store.compare_and_set(old_epoch, view):
            raise StateError(
                f"{self.config.proxy.state_file}: changed by someone else while starting"
            )

    def _publish_view(self) -> None:
        self.metrics.epoch.set(self.view.epoch)
        for b in self.backends.values():
            self.metrics.backend_in_sync.labels(b.name).set(
                1 if b.config.role == "shadow" or self.view.in_sync(b.name) else 0
            )

    def _change(self, new: View, why: str, *, even_if_unsaved: bool = False) -> bool:
        """Persist ``new``, then make it the view. False (logged) if it could not be stored.

        With ``even_if_unsaved`` the view changes in memory all the same: used for
        marking stale, where the stricter view is safe even if the disk failed.
        """
        if new is self.view:
            return True
        try:
            saved = self.store.compare_and_set(self.view.epoch, new)
            problem = "" if saved else "the state file was changed by someone else"
        except StateError as exc:
            saved, problem = False, str(exc)
        if not saved:
            log.error("cannot store view epoch %d (%s): %s", new.epoch, why, problem)
            if not even_if_unsaved:
                return False
        self.view = new
        self._publish_view()
        log.warning("view epoch %d: %s (primary %s)", new.epoch, why, new.primary)
        return True

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Start, run until SIGTERM/SIGINT (or :meth:`request_shutdown`), then drain."""
        with self._capture_signals(handle_signals):
            try:
                await self.start()
                await self._stop.wait()
            finally:
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
        await self.health.stop()
        if self._admin is not None:
            await self._admin.stop()
            self._admin = None
        if self._running and not self.sessions:
            # Every session's input reached every replica: the next start may trust them.
            try:
                self._store(self.view.epoch, self.view.with_clean(True))
                self.view = self.view.with_clean(True)
                self._running = False
            except StateError as exc:
                log.error("cannot record the clean stop: %s", exc)
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
        view = self.view
        min_in_sync = self.config.proxy.min_in_sync
        if min_in_sync:
            reachable = [
                r for r in view.replicas()
                if view.in_sync(r) and self.health.health(r) != "down"
            ]  # fmt: skip
            if len(reachable) < min_in_sync:
                self.metrics.refused.labels("min_in_sync").inc()
                self._ratelimit.log(
                    log,
                    logging.WARNING,
                    "min_in_sync",
                    "refused %s: %d in-sync replicas reachable, min_in_sync is %d",
                    peer,
                    len(reachable),
                    min_in_sync,
                )
                transport.abort()
                return None
        members = [Member(view.primary, "primary")]
        for b in self.config.backends:
            if b.name == view.primary:
                continue
            if b.role == "shadow":
                if b.sample >= 1.0 or random.random() < b.sample:
                    members.append(Member(b.name, "shadow"))
            elif view.in_sync(b.name):
                members.append(Member(b.name, "replica"))
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
        return None if name == self.view.primary else self.config.proxy.replica_buffer

    def mark_stale(self, name: str, reason: str, sid: int) -> None:
        if not self.view.in_sync(name) or name == self.view.primary:
            return
        self._change(
            self.view.mark_stale(name),
            f"replica {name} is now stale: {reason} (session {sid})",
            even_if_unsaved=True,
        )

    def promote_failed(self, old: str, new: str, reason: str, sid: int, kind: str) -> bool:
        """A session lost its primary ``old`` and moved to ``new`` (or wants to).

        ``kind`` is ``connect`` (the session waits for the answer) or
        ``midsession`` (it already took over). The view follows if it still
        names ``old``; if another session moved it first, the answer is whether
        ``new`` is still in sync.
        """
        view = self.view
        if view.primary == new:
            return True  # another session got there first
        if view.primary != old:
            return view.in_sync(new)
        if not view.in_sync(new):
            return False
        where = "at connect" if kind == "connect" else "mid-session"
        return self._failover(new, f"failover {where} (session {sid}): {reason}", kind)

    def _failover(self, new: str, why: str, kind: str) -> bool:
        old = self.view.primary
        if not self._change(self.view.promote(new, old_primary_missed_input=True), why):
            return False
        self.metrics.failovers.labels(kind).inc()
        log.warning("%s is the primary now; %s is stale", new, old)
        return True

    def _health_changed(self, name: str, health: Health, reason: str) -> None:
        self.metrics.backend_up.labels(name).set(1 if health == "up" else 0)
        if health == "up":
            stale = self.role_of(name) != "shadow" and not self.view.in_sync(name)
            log.info(
                "health: %s is up%s", name, " (stays stale until marked synced)" if stale else ""
            )
            return
        log.warning("health: %s is down: %s", name, reason)
        if name == self.view.primary:
            self._primary_down(name, reason)
        elif self.view.in_sync(name):
            self.mark_stale(name, f"health check saw it down ({reason}); it may restart empty", 0)

    def _primary_down(self, name: str, reason: str) -> None:
        """The primary failed its health checks: promote the first in-sync replica that is up."""
        candidates = [
            b.name
            for b in self.config.backends
            if b.name != name
            and self.role_of(b.name) == "replica"
            and self.view.in_sync(b.name)
            and self.health.health(b.name) == "up"
        ]
        if not candidates:
            log.error(
                "primary %s is down and no in-sync replica is up: new sessions will be "
                "refused until one is",
                name,
            )
            return
        if not self._failover(candidates[0], f"failover: primary {name} down ({reason})", "health"):
            return
        for driver in list(self.sessions):
            if driver.session.primary == name:
                driver.primary_down(reason)

    # ------------------------------------------- Control: the admin API's side

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def status(self) -> dict[str, Any]:
        view = self.view
        return {
            "epoch": view.epoch,
            "primary": view.primary,
            "mode": self.config.proxy.mode,
            "clean": view.clean,
            "backends": [
                {
                    "name": b.name,
                    "address": str(b.config.address),
                    "role": self.role_of(b.name),
                    # A shadow is never promoted, so it is never stale either.
                    "state": "in_sync"
                    if b.config.role == "shadow" or view.in_sync(b.name)
                    else "stale",
                    "health": self.health.health(b.name),
                    "sessions": b.sessions,
                    "divergences": b.divergences,
                }
                for b in self.backends.values()
            ],
        }

    def _known(self, name: str) -> Backend:
        b = self.backends.get(name)
        if b is None:
            raise ControlError(404, f"no backend named {name!r}")
        if b.config.role == "shadow":
            raise ControlError(409, f"{name!r} is a shadow: shadows are never promoted")
        return b

    def promote(self, name: str) -> dict[str, Any]:
        """Planned switchover: new sessions go to ``name``; live ones finish where they are."""
        self._known(name)
        try:
            new = self.view.promote(name, old_primary_missed_input=False)
        except IllegalTransition as exc:
            raise ControlError(409, str(exc)) from None
        old = self.view.primary
        if not self._change(new, f"switchover by the operator: {old} -> {name}"):
            raise ControlError(503, "the new view could not be stored: see the proxy's log")
        self.metrics.failovers.labels("manual").inc()
        return self.status()

    def mark_synced(self, name: str) -> dict[str, Any]:
        """The operator copied the primary's data to ``name``: it may be promoted again."""
        self._known(name)
        try:
            new = self.view.mark_synced(name)
        except IllegalTransition as exc:
            raise ControlError(409, str(exc)) from None
        if not self._change(new, f"{name} marked in sync by the operator"):
            raise ControlError(503, "the new view could not be stored: see the proxy's log")
        return self.status()

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
        elif kind in ("takeover", "closed"):
            log.warning("session %d: %s: %s", sid, name, detail)
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
            "outcome=%s%s%s",
            driver.sid,
            driver.peer,
            time.monotonic() - driver.started,
            s.received,
            s.delivered,
            ",".join(s.members),
            outcome,
            f" promoted={s.promoted}" if s.promoted else "",
            f" takeovers={s.takeovers}" if s.takeovers else "",
        )
