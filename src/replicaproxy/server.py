"""The proxy's lifecycle: listener, sessions, backend states, shutdown.

``Server(config)`` owns everything that lives longer than one session. It
builds a :class:`~replicaproxy.core.session.Session` for each accepted client
and hands it to a :class:`~replicaproxy.io.driver.SessionDriver`; it never
reaches into a session, it only hears what sessions report.

The view itself is kept by a :class:`~replicaproxy.viewkeeper.ViewKeeper`: the
server asks it for changes (failovers, stale marks, the operator's requests) and
hears from it what peers changed, which it applies to its sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import random
import signal
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from prometheus_client import CollectorRegistry

from replicaproxy import __version__, compiled
from replicaproxy.config import (
    Address,
    BackendConfig,
    Config,
    ConfigError,
    IPNetwork,
    is_loopback,
)
from replicaproxy.control import ControlError
from replicaproxy.core import postgres
from replicaproxy.core.events import CLIENT, PromoteResult
from replicaproxy.core.session import Limits, Member, Role, Session
from replicaproxy.core.view import IllegalTransition, View
from replicaproxy.health import LOCAL_FAILURE, Health, HealthChecker, probe
from replicaproxy.io.driver import ClientProtocol, Flusher, MemoryBudget, SessionDriver, Timers
from replicaproxy.io.handshake import TlsListener, quiet_tls_reports
from replicaproxy.logutil import AccessLog, RateLimited, describe_error, one_line
from replicaproxy.metrics import Metrics
from replicaproxy.protocols import Protocols
from replicaproxy.store import (
    Snapshot,
    StateError,
    StoreDown,
    StoreOptions,
    ViewStore,
    open_store,
)
from replicaproxy.tls import (
    CLOSED,
    FAILURES,
    ClientTls,
    TlsFileError,
    client_context,
    handshake_failure,
    reload_pair,
    server_context,
    ssl_message,
)
from replicaproxy.viewkeeper import Decision, ViewKeeper

log = logging.getLogger(__name__)


#: What a session that was never counted had reported so far (read only).
_NOTHING_SEEN: dict[str, tuple[int, int]] = {}


class StartError(Exception):
    """The proxy cannot start (an address in use, say); the message says what and why."""


#: Events kept for the status page and ``ctl events``: a few screens' worth.
EVENTS_KEPT = 200
#: How often byte counters and lag gauges are brought up to date.
TICK_SECONDS = 1.0
#: A process being killed still accepts connections for a moment while the kernel
#: tears its sockets down (a probe right after a killed Redis's FIN found it up in 2 of
#: 30 tries on a loaded machine): a backend is alive only if it accepts again this
#: much later.
ALIVE_RECHECK = 0.1
#: PostgreSQL cancel keys kept at most (one per live session that logged in).
MAX_CANCEL_KEYS = 100_000
#: Distinct ``request`` labels of replicaproxy_allowed_differences before ``other``.
MAX_REQUEST_LABELS = 200


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def _call_later(delay: float, callback: Callable[[], None]) -> None:
    asyncio.get_running_loop().call_later(delay, callback)


def _allowed(peer: object, allow: tuple[IPNetwork, ...]) -> bool:
    """Whether a client's address is in the allow-list."""
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener sees ::ffff:10.0.0.1
    return any(address in net for net in allow)


def _flusher(config: Config) -> Flusher | None:
    """Batched replica writes: async mode only (sync mode waits for replicas)."""
    p = config.proxy
    return Flusher(p.replica_flush) if p.mode == "async" and p.replica_flush > 0 else None


def _store_options(config: Config) -> StoreOptions:
    p = config.proxy
    return StoreOptions(
        ca_file=p.store_ca_file,
        cert_file=p.store_cert_file,
        key_file=p.store_key_file,
        user=p.store_user,
        password=p.store_password,
    )


def store_label(store: ViewStore) -> str:
    """How messages name the place of the view: the state file's path, or etcd's key."""
    about = store.describe()
    if store.kind == "file":
        return str(about["path"])
    return f"etcd {','.join(about['endpoints'])} {about['prefix']}/view"


def _backend_tls(config: Config) -> dict[str, ClientTls]:
    """TLS to each backend with ``tls = true``, from its files as they are now."""
    # PostgreSQL asks for TLS inside its protocol, with an SSLRequest.
    preface = postgres.ssl_request() if config.proxy.protocol == "postgres" else b""
    return {
        b.name: ClientTls(
            client_context(ca=b.tls_ca, cert=b.tls_cert, key=b.tls_key), b.server_name, preface
        )
        for b in config.backends
        if b.tls
    }


def _client_tls(config: Config) -> ssl.SSLContext | None:
    """The client listener's TLS context (``[proxy] tls_*``); None: plaintext."""
    p = config.proxy
    if not p.tls_cert:
        return None
    return server_context(
        p.tls_cert, p.tls_key, client_ca=p.tls_client_ca, min_version=p.tls_min_version
    )


def _admin_tls(config: Config) -> ssl.SSLContext | None:
    """The admin API's TLS context (``[admin] tls_*``); None: plain HTTP."""
    a = config.admin
    return server_context(a.tls_cert, a.tls_key) if a.tls_cert else None


def _limits(config: Config) -> Limits:
    """The per-session limits a config asks for."""
    p = config.proxy
    return Limits(
        replica_buffer=p.replica_buffer,
        compare_window=p.compare_window,
        close_grace=p.close_grace,
        # A healthy backend takes its last bytes within a few round trips;
        # twice the connect timeout is already generous for that.
        linger=max(1.0, 2 * p.connect_timeout),
        mode=p.mode,
        replica_timeout=p.replica_timeout,
        min_in_sync=p.min_in_sync,
        divergence_stale=p.divergence == "stale",
    )


@dataclass(slots=True)
class Backend:
    """A backend as the server sees it across sessions (its sync state is in the view)."""

    config: BackendConfig
    divergences: int = field(default=0)
    allowed: int = 0  # replies that differed as the protocol's rules allow
    bytes_to: int = 0  # handed to its sockets, over all sessions
    bytes_from: int = 0  # read from its sockets
    lag: int = 0  # input accepted for it, not yet handed to its sockets (last tick)

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
        store: ViewStore | None = None,
        reset_state: bool = False,
        config_source: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self._config_source = config_source
        self.metrics = metrics if metrics is not None else Metrics()
        self.backends: dict[str, Backend] = {b.name: Backend(b) for b in config.backends}
        self.store: ViewStore = store or open_store(
            config.proxy.store_url, options=_store_options(config)
        )
        self._reset_state = reset_state
        self.keeper = ViewKeeper(
            self.store,
            self,
            self.metrics,
            ttl=config.proxy.store_ttl,
            where=store_label(self.store),
        )
        # Until start() reads the store: the config's own view.
        self.keeper.view = View.new(config.primary.name, self._promotable())
        self.sessions: set[SessionDriver] = set()
        self._by_sid: dict[int, SessionDriver] = {}
        self._members: dict[tuple[str, Role], Member] = {}  # (see _member)
        #: PostgreSQL cancel keys: what each client got (to its session), and each
        #: session's own key on every backend (see :meth:`cancel`).
        self._client_keys: dict[bytes, int] = {}
        self._backend_keys: dict[int, dict[str, bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Cut off from the view store (on_store_loss = "stop"): no clients until it is back.
        self._fenced = False
        self.started = asyncio.Event()
        self.bound: Address | None = None
        self.admin_bound: Address | None = None
        self._ids = itertools.count(1)
        self._limits = _limits(config)
        self.health = self._new_health_checker()
        self._retired: dict[str, Backend] = {}  # removed by a reload, still in sessions
        #: Input held for each replica and shadow over all sessions (replica_memory).
        self._memory: dict[str, MemoryBudget] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self._event_ids = itertools.count(1)
        self._started_at = time.monotonic()
        self.sessions_total = 0
        self._client_bytes = {"from_client": 0, "to_client": 0}
        self._reported: dict[SessionDriver, dict[str, tuple[int, int]]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._draining = False
        self._flusher = _flusher(config)
        self._timers = Timers()  # every session's timers, on one of the loop's
        self._admin: Any = None
        self._running = False  # the store says this proxy runs on this view
        #: How the run before this one ended, as the state file said at start:
        #: "clean", "unclean" (every replica made stale) or "none" (a new view).
        self.last_stop = "none"
        self._listener: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ratelimit = RateLimited(schedule=_call_later)
        self._access_log = AccessLog(
            logging.getLogger("replicaproxy.access"),
            ("session", "client", "duration", "from_client", "to_client", "backends", "outcome"),
        )
        self.protocols = Protocols(config)
        self._learning: asyncio.Task[None] | None = None
        #: Sessions waiting to hear whether a backend is alive (CheckPrimary), by backend.
        self._alive_checks: dict[str, list[Callable[[bool, str], None]]] = {}
        #: TLS to the backends that have it: built at start and at each reload.
        self._backend_tls: dict[str, ClientTls] = {}
        #: The client listener's handshakes ([proxy] tls_cert), from start.
        self._tls: TlsListener | None = None
        self._request_labels: set[str] = set()  # (see _request_label)
        self._admin_tls: ssl.SSLContext | None = None
        self._loud_tls: Callable[[], None] | None = None  # puts the loop's handler back

    @property
    def view(self) -> View:
        """The view this proxy acts on (kept by ``self.keeper``)."""
        return self.keeper.view

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run ``coro`` beside the sessions; a failure is logged, never lost."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed: %s", task.get_name(), exc, exc_info=exc)

    def _new_health_checker(self) -> HealthChecker:
        return HealthChecker(
            self.config.health,
            {b.name: b.config.address for b in self.backends.values()},
            self._health_changed,
            self.tls_of,
        )

    def _promotable(self) -> list[str]:
        """Replicas in config order (shadows are never in the view)."""
        return [b.name for b in self.config.backends if b.role == "replica"]

    def role_of(self, name: str) -> str:
        if name == self.view.primary:
            return "primary"
        return "shadow" if self._backend(name).config.role == "shadow" else "replica"

    def _backend(self, name: str) -> Backend:
        """A configured backend, or one a reload removed while sessions still use it."""
        b = self.backends.get(name)
        return b if b is not None else self._retired[name]

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind the listener, read and join the view, start health checks and the admin API.

        ``started`` is set and ``listening on HOST:PORT`` logged once clients can come.
        Raises StateError when the stored view cannot be used, StartError when the
        listener cannot be bound or the view store cannot be reached.
        """
        loop = asyncio.get_running_loop()
        listen = self.config.proxy.listen
        try:
            # (Read at start as they are now: the config checked them a moment ago.)
            self._backend_tls = _backend_tls(self.config)
            client_tls = _client_tls(self.config)
            self._admin_tls = _admin_tls(self.config)
        except TlsFileError as exc:
            raise StartError(f"TLS: {exc.message}") from None
        # (Always: a reload may give a backend TLS, and the etcd store may speak it.)
        self._loud_tls = quiet_tls_reports(loop)
        if client_tls is not None:
            self._tls = TlsListener(
                client_tls,
                lambda: ClientProtocol(self._accept, half_close=False),
                self._handshake_failed,
                admit=self._admit_handshake,
            )
        try:
            # Bound but not accepting until the view is read: the port names this proxy.
            self._listener = await loop.create_server(
                self._client_protocols(),
                listen.host,
                listen.port,
                reuse_address=True,
                backlog=1024,
                start_serving=False,
            )
        except OSError as exc:
            raise StartError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        sock = self._listener.sockets[0].getsockname()
        self.bound = Address(str(sock[0]), int(sock[1]))
        if self.config.admin.listen is not None:
            from replicaproxy.admin.app import AdminServer

            admin = self.config.admin.listen
            self._admin = AdminServer(
                self, admin, token=self.config.admin.token, tls=self._admin_tls
            )
            try:
                self.admin_bound = await self._admin.start()
            except OSError as exc:
                self._admin = None
                raise StartError(
                    f"cannot listen on {admin} (admin API): {exc.strerror or exc}"
                ) from None
        info = {
            "listen": str(self.bound),
            "admin": str(self.admin_bound) if self.admin_bound else None,
            "version": __version__,
        }
        try:
            await self.keeper.start(self._first_view, self._name(), info)
        except StoreDown as exc:
            raise StartError(f"cannot reach the view store {self.keeper.where}: {exc}") from None
        self._running = True
        self._publish_view()
        if not self.config.proxy.allow and not is_loopback(listen.host):
            log.warning(
                "listening on %s with no proxy.allow list: any host that can reach it may "
                "connect (and its bytes go to every backend)",
                listen,
            )
        self.health.start()
        self._ticker = loop.create_task(self._tick(), name="metrics-tick")
        self._learn_rules()
        await self._listener.start_serving()
        log.info(
            "listening on %s (%sprimary %s, %s mode, epoch %d, %s data path)",
            self.bound,
            "TLS, " if self._tls is not None else "",
            self.view.primary,
            self.config.proxy.mode,
            self.view.epoch,
            compiled.data_path(),
        )
        if self.store.shared:
            log.info(
                "sharing the view in %s as %s with %d proxies (store_ttl %g s, on_store_loss = %s)",
                self.keeper.where,
                self.keeper.name,
                len(self.keeper.members),
                self.config.proxy.store_ttl,
                self.config.proxy.on_store_loss,
            )
        if stale := compiled.stale():
            log.warning(
                "the compiled %s is older than its source, which is not what runs: "
                "reinstall (make install, or pip install -e .)",
                " and ".join(stale),
            )
        self.started.set()

    def _name(self) -> str:
        """This proxy's name among its peers: the config's, or HOSTNAME:PORT."""
        assert self.bound is not None
        return self.config.proxy.name or f"{socket.gethostname()}:{self.bound.port}"

    def _first_view(self, snapshot: Snapshot) -> tuple[View, int | None]:
        """The view to start from: the stored one fitted to the config (DESIGN.md "State").

        Returns it with the revision to swap it in at. Raises StateError when the
        stored view cannot be used with this config.
        """
        stored = snapshot.view
        configured = self._promotable()
        primary = self.config.primary.name
        label = "state file" if self.store.kind == "file" else "shared view"
        if stored is None or self._reset_state:
            view = View.new(primary, configured)
            if stored is not None:
                view = View(stored.view.epoch + 1, view.primary, view.backends)
                log.warning(
                    "--reset-state: starting from the config (primary %s, every replica in "
                    "sync), epoch %d",
                    primary,
                    view.epoch,
                )
            self.last_stop = "none"
            return view, None if stored is None else stored.revision
        try:
            view, notes = stored.view.reconcile(primary, [primary, *configured])
        except IllegalTransition as exc:
            raise StateError(f"{self.keeper.where}: {exc}") from None
        if view.primary != primary:
            log.warning(
                "the %s's view (epoch %d) names %s as primary, not the config's %s: using the %s",
                label,
                view.epoch,
                view.primary,
                primary,
                label,
            )
        for note in notes:
            log.warning("%s: %s", label, note)
        runs = {n: m.run for n, m in snapshot.members.items()}
        dead = view.unclean_runs(runs)
        self.last_stop = "unclean" if dead else "clean"
        if dead:
            # A proxy died without flushing: input it had accepted may never have
            # reached some replicas. None can be trusted now.
            view = view.after_unclean_stop(dead)
            peers = [n for n in dead if n not in (self._name(), "(the last proxy)")]
            if not self.store.shared:
                peers = []  # one proxy: whatever its name was, it was this one
            log.error(
                "the last run of %s did not stop cleanly: every replica is stale until an "
                "operator marks it synced (replicaproxy ctl mark-synced)",
                f"proxies {', '.join(peers)}" if peers else "the proxy",
            )
        return view, stored.revision

    def _publish_view(self) -> None:
        self.metrics.epoch.set(self.view.epoch)
        for b in self.backends.values():
            self.metrics.backend_in_sync.labels(b.name).set(
                1 if b.config.role == "shadow" or self.keeper.in_sync(b.name) else 0
            )

    async def _change(
        self,
        decide: Decision,
        why: str | Callable[[View, View], str],
        *,
        kind: str,
        backend: str | None = None,
    ) -> bool:
        """Ask the keeper for a change; False (logged) when it could not be stored."""
        return await self.keeper.change(decide, why, kind=kind, backend=backend)

    # ------------------------------------------ KeeperHost: told by the keeper

    def view_changed(
        self, old: View, new: View, *, source: str, why: str, kind: str, backend: str | None
    ) -> None:
        """A new view: publish it; if a peer stored it, bring the sessions in line."""
        self._publish_view()
        if new.primary != old.primary:
            self._learn_rules()
        if source == "local":
            log.warning("view epoch %d: %s (primary %s)", new.epoch, why, new.primary)
            self._event(kind, backend, why)
            # (A change a session asked for is in that session already; one the keeper
            # made, a peer's unclean stop, reaches the others here.)
            self._follow(new)
            return
        moved = f"primary {old.primary} -> {new.primary}" if new.primary != old.primary else ""
        stale = [n for n in new.backends if old.in_sync(n) and not new.in_sync(n)]
        synced = [n for n in new.backends if new.in_sync(n) and not old.in_sync(n)]
        what = "; ".join(
            x
            for x in (
                moved,
                f"stale: {', '.join(stale)}" if stale else "",
                f"in sync: {', '.join(synced)}" if synced else "",
            )
            if x
        )
        log.warning(
            "view epoch %d adopted (%s): %s (primary %s)",
            new.epoch,
            why,
            what or "no backend changed",
            new.primary,
        )
        self._event("peer", None, f"view epoch {new.epoch} ({why}): {what or 'no change'}")
        self._follow(new)

    def _follow(self, view: View) -> None:
        """Sessions leave what ``view`` (stored by a peer) says is stale.

        A session whose primary is stale there is taken over by an in-sync replica of
        the session where that is allowed, and closed otherwise: it must not write on
        to a demoted primary. A replica stale there leaves the session. (A backend that
        stays in sync is left alone: after a planned switchover both are in sync, and a
        session on the old primary finishes there, as on the proxy that made it.)
        """
        for driver in list(self.sessions):
            s = driver.session
            p = s.primary
            if not view.in_sync(p):
                driver.primary_down(f"{p} is stale in view epoch {view.epoch}")
                continue
            for name in s.members:
                if (
                    name != p
                    and s.in_session(name)
                    and self._backend(name).config.role != "shadow"
                    and not view.in_sync(name)
                ):
                    driver.backend_stale(name, f"stale in view epoch {view.epoch}")

    def store_lost(self, why: str) -> None:
        """The lease is gone: stop serving (or, if asked to, serve on), and say so once."""
        self._event("store", None, f"lost the view store: {why}")
        if self.config.proxy.on_store_loss == "serve":
            log.error(
                "lost the view store (%s): serving on with view epoch %d, as on_store_loss = "
                '"serve" asks; peers may promote another primary meanwhile',
                why,
                self.view.epoch,
            )
            return
        self._fenced = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        log.error(
            "lost the view store (%s): stopped accepting and closing %d sessions; serving "
            "again once it answers and the view is read again",
            why,
            len(self.sessions),
        )
        for driver in list(self.sessions):
            driver.shutdown()

    def store_back(self) -> None:
        """Registered again with the view read: accept clients again."""
        self._event("store", None, f"the view store answers again: epoch {self.view.epoch}")
        self._publish_view()
        if not self._fenced:
            return
        self._fenced = False
        if self._stop.is_set() or self.bound is None:
            return
        self._spawn(self._listen_again(), "listen-again")

    async def _listen_again(self) -> None:
        assert self.bound is not None
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                self._client_protocols(),
                self.bound.host,
                self.bound.port,
                reuse_address=True,
                backlog=1024,
            )
        except OSError as exc:
            log.error("cannot listen on %s again: %s", self.bound, exc.strerror or exc)
            return
        log.warning("accepting clients again on %s (view epoch %d)", self.bound, self.view.epoch)

    def _event(self, kind: str, backend: str | None, message: str) -> None:
        """Keep an event for the status page and ``ctl events``."""
        self._events.append(
            {
                "id": next(self._event_ids),
                "time": time.time(),
                "kind": kind,
                "backend": backend,
                "epoch": self.view.epoch,
                "message": message,
            }
        )

    async def serve(
        self, *, handle_signals: bool = True, on_start: Callable[[], None] | None = None
    ) -> None:
        """Start, run until SIGTERM/SIGINT (or :meth:`request_shutdown`), then drain.

        ``on_start`` is called as soon as the proxy listens."""
        with self._capture_signals(handle_signals):
            try:
                await self.start()
                if on_start is not None:
                    on_start()
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
        grace: float | None = None if self._draining else self.config.proxy.shutdown_grace
        if self.sessions:
            log.info(
                "stopping: waiting %s for %d sessions to finish",
                "for as long as they last" if grace is None else f"up to {grace:.1f} s",
                len(self.sessions),
            )
            await self._wait_idle(grace)
        if self.sessions:
            log.info("stopping: closing %d sessions still open", len(self.sessions))
            for driver in list(self.sessions):
                driver.shutdown()
            await self._wait_idle(self._limits.linger + 1.0)
        await self.health.stop()
        if self._learning is not None:
            self._learning.cancel()
        self._ratelimit.flush()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for task in list(self._tasks):
            task.cancel()
        if self._admin is not None:
            await self._admin.stop()
            self._admin = None
        # With no session left, every session's input reached every replica: the next
        # start may trust them. Otherwise the run stays listed: an unclean stop.
        await self.keeper.stop(clean=self._running and not self.sessions)
        self._running = False
        if self._loud_tls is not None:
            self._loud_tls()
            self._loud_tls = None
        if self.started.is_set():
            # (A start that failed says why in its own error, and nothing else.)
            log.info("stopped")

    async def _wait_idle(self, limit: float | None) -> None:
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
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        try:
            yield
        finally:
            for sig in (*sigs, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading the config")
        self._spawn(self._reload_quietly(), "reload")

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(ControlError):  # reload() logs it and keeps an event
            await self.reload()

    # -------------------------------------------------------------- sessions

    def _client_protocols(self) -> Callable[[], asyncio.BaseProtocol]:
        """The listener's protocol factory: a TLS handshake first when configured."""
        if self._tls is not None and not self.protocols.preamble:
            return self._tls
        # PostgreSQL asks for TLS inside its protocol (SSLRequest): the driver answers.
        return lambda: ClientProtocol(self._accept)

    def client_tls(self) -> ssl.SSLContext | None:
        """The context for a client's TLS begun inside its protocol (PostgreSQL)."""
        return self._tls.context if self._tls is not None else None

    def handshake_failed(self, exc: BaseException, peer: str) -> None:
        self._handshake_failed(exc, peer)

    def _admit_handshake(self, handshakes: int) -> bool:
        """Whether a client may begin a TLS handshake: within max_connections, counting
        the handshakes under way (each holds a descriptor until it ends)."""
        limit = self.config.proxy.max_connections
        if len(self.sessions) + handshakes < limit:
            return True
        self.metrics.refused.labels("max_connections").inc()
        self._ratelimit.log(
            log,
            logging.WARNING,
            "max_connections",
            "refused a client: max_connections (%d) reached (%d TLS handshakes under way)",
            limit,
            handshakes,
        )
        return False

    def _handshake_failed(self, exc: BaseException, peer: str) -> None:
        """A client's TLS handshake failed: the connection is closed; count it, say why."""
        reason = handshake_failure(exc)
        self.metrics.tls_handshake_failures.labels(reason).inc()
        detail = FAILURES[reason]
        if isinstance(exc, ssl.SSLError):
            detail += f" ({ssl_message(exc)})"
        if reason == CLOSED:  # a load balancer's TCP check looks like this: no line each
            log.debug("TLS handshake with %s failed (%s): %s", peer, reason, detail)
            return
        self._ratelimit.log(
            log,
            logging.WARNING,
            f"tls:{reason}",
            "TLS handshake with %s failed (%s): %s",
            peer,
            reason,
            detail,
        )

    def _accept(self, transport: asyncio.Transport) -> SessionDriver | None:
        peer = transport.get_extra_info("peername")
        if self._stop.is_set() or self._fenced:
            transport.abort()
            return None
        allow = self.config.proxy.allow
        if allow and not _allowed(peer, allow):
            self.metrics.refused.labels("acl").inc()
            self._ratelimit.log(log, logging.WARNING, "acl", "refused %s: not in proxy.allow", peer)
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
                if self.keeper.in_sync(r) and self.health.health(r) != "down"
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
        primary = view.primary
        member = self._member
        members = [member(primary, "primary")]
        in_sync = self.keeper.in_sync
        for b in self.config.backends:
            name = b.name
            if name == primary:
                continue
            if b.role == "shadow":
                if b.sample >= 1.0 or random.random() < b.sample:
                    members.append(member(name, "shadow"))
            elif in_sync(name):
                members.append(member(name, "replica"))
        sid = next(self._ids)
        proxy = self.config.proxy
        driver = SessionDriver(
            sid,
            Session(members, self._limits, self.protocols.framing()),
            self,
            transport,
            connect_timeout=proxy.connect_timeout,
            idle_timeout=proxy.idle_timeout,
            flusher=self._flusher,
            timers=self._timers,
            preamble=self.protocols.preamble,
            peername=peer,
        )
        self.sessions.add(driver)
        self._by_sid[sid] = driver
        if self._idle.is_set():
            self._idle.clear()
        metrics = self.metrics
        metrics.sessions.value += 1
        metrics.sessions_active.value += 1
        self.sessions_total += 1
        driver.start()
        return driver

    def _member(self, name: str, role: Role) -> Member:
        """``Member(name, role)``: one made before when there is one (they are frozen)."""
        key = (name, role)
        m = self._members.get(key)
        if m is None:
            m = self._members[key] = Member(name, role)
        return m

    # ---------------------------------------- SessionHost: called by drivers

    def address_of(self, name: str) -> Address:
        b = self.backends.get(name)  # (what _backend does, a call less per connect)
        return (b if b is not None else self._retired[name]).config.address

    def tls_of(self, name: str) -> ClientTls | None:
        """How to speak TLS to ``name``; None: plaintext."""
        return self._backend_tls.get(name)

    def connected(self, name: str, seconds: float) -> None:
        self.metrics.connect_time_of(name).observe(seconds)

    def write_limit(self, name: str) -> int | None:
        """Replicas and shadows may hold ``replica_buffer`` bytes; the primary the default."""
        return None if name == self.keeper.view.primary else self.config.proxy.replica_buffer

    def memory_of(self, name: str) -> MemoryBudget:
        """The memory budget of ``name`` as a replica or shadow, over all sessions."""
        budget = self._memory.get(name)
        if budget is None:
            limit = self.config.proxy.replica_memory
            budget = self._memory[name] = MemoryBudget(name, limit, self._over_memory)
        return budget

    def _over_memory(self, name: str) -> None:
        """The input held for ``name`` over all sessions passed replica_memory: it leaves
        every session it is a replica or shadow in, and a replica becomes stale.

        One line says so (a shadow that fills up again in new sessions: at most one per
        5 s). Sessions whose primary it is are never affected, nor is the primary's
        own input: it never counts against a budget.
        """
        budget = self._memory[name]
        held, limit = budget.held, budget.limit
        replica = name in self.view.backends and name != self.view.primary
        if replica:
            # Before the sessions ask for it, so the view names no session.
            self.mark_stale(name, "more input held for it than replica_memory", 0)
        reason = f"more than replica_memory ({_mib(limit)}) of input held for it"
        left = sum(1 for driver in list(self.sessions) if driver.over_memory(name, reason))
        if left:
            self.metrics.dropped.labels(name).inc(left)
        sessions = f"{left} session{'' if left == 1 else 's'}"
        stale = "; it is stale now" if replica else ""
        role = "replica" if replica else "shadow"
        message = (
            f"{name} left {sessions}: {_mib(held)} of input was held for it, more than "
            f"replica_memory ({_mib(limit)}) allows{stale}. Raise [proxy] replica_memory "
            f"where a {role} may fall this far behind"
        )
        self._event("memory", name, message)
        self._ratelimit.log(log, logging.WARNING, f"memory:{name}", "%s", message)
        budget.rearm()

    def mark_stale(self, name: str, reason: str, sid: int) -> None:
        """A session saw ``name`` miss input: it is stale from now on (stored soon after)."""
        if not self.keeper.in_sync(name) or name == self.view.primary:
            return
        why = f"replica {name} is now stale: {reason}" + (f" (session {sid})" if sid else "")
        self.keeper.mark_stale(name, why)

    def promote_failed(self, old: str, new: str, reason: str, sid: int, kind: str) -> None:
        """A session lost its primary ``old`` and moved to ``new`` (or wants to).

        ``kind`` is ``connect`` (the session waits for the answer) or
        ``midsession`` (it already took over). The view follows if it still
        names ``old``; if another session or a peer moved it first, the answer is
        whether ``new`` is still in sync. The answer comes as a ``PromoteResult``
        once the change is stored (the session waits for it as for any event).
        """
        where = "at connect" if kind == "connect" else "mid-session"
        self._spawn(
            self._promote_for(sid, old, new, f"failover {where} (session {sid}): {reason}", kind),
            f"promote-{sid}",
        )

    async def _promote_for(self, sid: int, old: str, new: str, why: str, kind: str) -> None:
        ok = await self._failover(old, new, why, kind)
        view = self.view
        answer = ok and (view.primary == new or (view.primary != old and view.in_sync(new)))
        driver = self._by_sid.get(sid)
        if driver is not None:
            driver.feed(PromoteResult(new, answer))

    async def _failover(self, old: str, new: str, why: str, kind: str) -> bool:
        """Promote ``new`` in place of the failed ``old``, unless the view moved on already.

        True when the view names ``new`` now, or no longer names ``old`` (someone was
        first); False when ``new`` may not be promoted or the change was not stored.
        """
        made = [False]

        def decide(view: View) -> View:
            made[0] = False
            if view.primary != old or not view.in_sync(new) or new in self.keeper.marking:
                return view
            made[0] = True
            return view.promote(new, old_primary_missed_input=True)

        if not await self._change(decide, why, kind="failover", backend=new):
            return False
        if made[0]:
            self.metrics.failovers.labels(kind).inc()
            log.warning("%s is the primary now; %s is stale", new, old)
        return self.view.primary != old

    def _health_changed(self, name: str, health: Health, reason: str) -> None:
        self.metrics.backend_up.labels(name).set(1 if health == "up" else 0)
        self._event("health", name, f"{name} is {health}: {reason}")
        if health == "up":
            if name == self.view.primary:
                self._learn_rules()  # (back, or first seen: it may have been upgraded)
            stale = self.role_of(name) != "shadow" and not self.keeper.in_sync(name)
            log.info(
                "health: %s is up%s", name, " (stays stale until marked synced)" if stale else ""
            )
            return
        log.warning("health: %s is down: %s", name, reason)
        if name == self.view.primary:
            self._spawn(self._primary_down(name, reason), f"primary-down-{name}")
        elif self.keeper.in_sync(name):
            self.mark_stale(name, f"health check saw it down ({reason}); it may restart empty", 0)

    async def _primary_down(self, name: str, reason: str) -> None:
        """The primary failed its health checks: promote the first in-sync replica that is up."""

        def candidates(view: View) -> list[str]:
            return [
                b.name
                for b in self.config.backends
                if b.name != name
                and b.role != "shadow"
                and view.in_sync(b.name)
                and self.keeper.in_sync(b.name)
                and self.health.health(b.name) == "up"
            ]

        if self.view.primary == name and not candidates(self.view):
            log.error(
                "primary %s is down and no in-sync replica is up: new sessions will be "
                "refused until one is",
                name,
            )
            return
        first = (candidates(self.view) or [""])[0]
        made = [""]

        def decide(view: View) -> View:
            made[0] = ""
            if view.primary != name:
                return view  # replaced already (by a session, or a peer)
            found = candidates(view)
            if not found:
                return view
            made[0] = found[0]
            return view.promote(found[0], old_primary_missed_input=True)

        why = f"failover: primary {name} down ({reason})"
        if not await self._change(decide, why, kind="failover", backend=first):
            return
        if made[0]:
            self.metrics.failovers.labels("health").inc()
            log.warning("%s is the primary now; %s is stale", made[0], name)
        if self.view.primary == name:
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
        in_session: dict[str, int] = {}
        for driver in self.sessions:
            self._account(driver)  # byte totals as of now, not of the last tick
            for name in driver.session.members:
                if driver.session.in_session(name):
                    in_session[name] = in_session.get(name, 0) + 1
        return {
            "epoch": view.epoch,
            "primary": view.primary,
            "mode": self.config.proxy.mode,
            "protocol": self.protocols.status(),
            "clean": view.clean,
            "last_stop": self.last_stop,
            "uptime": round(time.monotonic() - self._started_at, 3),
            "sessions_active": len(self.sessions),
            "sessions_total": self.sessions_total,
            "client_bytes": dict(self._client_bytes),
            "draining": self._draining,
            "tls": self._tls is not None,
            "backends": [
                {
                    "name": b.name,
                    "address": str(b.config.address),
                    "tls": b.config.tls,
                    "role": self.role_of(b.name),
                    # A shadow is never promoted, so it is never stale either.
                    "state": "in_sync"
                    if b.config.role == "shadow" or self.keeper.in_sync(b.name)
                    else "stale",
                    "health": self.health.health(b.name),
                    "sessions": in_session.get(b.name, 0),
                    "divergences": b.divergences,
                    "allowed_differences": b.allowed,
                    "bytes_to": b.bytes_to,
                    "bytes_from": b.bytes_from,
                    "lag_bytes": b.lag,
                    # What replica_memory bounds: input held for it over all sessions
                    # (as each session last measured it: per batch, and every second).
                    "held_bytes": self._held(b.name),
                    "memory_budget": None
                    if b.name == view.primary
                    else self.config.proxy.replica_memory,
                }
                for b in self.backends.values()
            ],
            "store": {
                **self.keeper.describe(),
                "on_store_loss": self.config.proxy.on_store_loss,
                "fenced": self._fenced,
            },
            "proxies": [
                {**m.describe(), "self": m.name == self.keeper.name}
                for m in sorted(self.keeper.members.values(), key=lambda m: m.name)
            ],
        }

    def _held(self, name: str) -> int:
        budget = self._memory.get(name)
        return budget.held if budget is not None else 0

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self._events if e["id"] > since]

    def drain(self) -> dict[str, Any]:
        """Stop accepting; exit once every open session has ended on its own."""
        if not self._draining:
            self._draining = True
            log.warning("draining: no new sessions; exiting when %d end", len(self.sessions))
            self._event("drain", None, f"draining: {len(self.sessions)} sessions open")
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._stop.set()
        return {"draining": True, "sessions": len(self.sessions)}

    async def reload(self) -> dict[str, Any]:
        """Re-read the config; apply it without dropping sessions, or keep the old one."""
        if self._config_source is None:
            raise ControlError(409, "nothing to reload: the proxy was started without --config")
        try:
            new = self._config_source()
            changes = await self._apply(new)
        except (ConfigError, ControlError) as exc:
            message = exc.message if isinstance(exc, ControlError) else str(exc)
            log.error("reload rejected, the running config is kept: %s", one_line(message))
            self._event("reload", None, f"rejected: {message}")
            raise ControlError(
                400, f"reload rejected, the running config is kept: {message}"
            ) from None
        summary = "; ".join(changes) if changes else "nothing changed"
        log.warning("reloaded the config: %s", summary)
        self._event("reload", None, summary)
        return {"ok": True, "changes": changes}

    async def _apply(self, new: Config) -> list[str]:
        """Switch to ``new``; raise ControlError (changing nothing) when it cannot be."""
        old = self.config
        primary = self.view.primary
        before = {b.name: b for b in old.backends}
        after = {b.name: b for b in new.backends}
        if primary not in after or after[primary].role == "shadow":
            raise ControlError(
                400, f"the current primary {primary!r} must stay a primary or replica backend"
            )
        if after[primary].address != before[primary].address:
            raise ControlError(400, f"the current primary {primary!r} cannot change its address")
        changes: list[str] = []
        moved = {n for n in before.keys() & after.keys() if before[n].address != after[n].address}
        for n, b in after.items():
            if n not in before:
                changes.append(f"added {b.role} {n} ({b.address})")
            elif n in moved:
                changes.append(f"{n} moved to {b.address}: stale until marked synced")
        changes += [f"removed {before[n].role} {n}" for n in before if n not in after]
        for section in ("proxy", "health", "admin"):
            was, now = getattr(old, section), getattr(new, section)
            for f in fields(was):
                a, b = getattr(was, f.name), getattr(now, f.name)
                if a != b:
                    shown = "(changed)" if f.name == "token" else f"{a} -> {b}"
                    changes.append(f"{section}.{f.name}: {shown}")
        for what in (
            "proxy.listen", "admin.listen", "admin.token", "proxy.state_file",
            "proxy.view_store", "proxy.name", "proxy.store_ttl", "proxy.on_store_loss",
        ):  # fmt: skip
            if any(c.startswith(what + ":") for c in changes):
                log.warning("reload: %s takes effect at the next restart", what)
        tls = self._reload_tls(new)

        # The view: new replicas (and moved ones) start stale, removed ones leave it.
        def decide(view: View) -> View:
            promotable = [view.primary] + [
                b.name for b in new.backends if b.role != "shadow" and b.name != view.primary
            ]
            return view.reconcile(view.primary, promotable, reset=moved)[0]

        try:
            stored = await self._change(decide, "config reloaded", kind="reload")
        except IllegalTransition as exc:  # a peer made a removed backend the primary
            raise ControlError(400, str(exc)) from None
        if not stored:
            raise ControlError(400, "the new view could not be stored: see the log")
        for n in before:
            if n not in after or n in moved:
                self._retired[n] = self.backends.pop(n)
                if n not in after:
                    self.metrics.forget_backend(n)
        for b in new.backends:
            if b.name in self.backends:
                self.backends[b.name].config = b
            else:
                self.backends[b.name] = Backend(b)
        if new.protocols != old.protocols:
            changes.append("protocol rules changed (for new sessions)")
        self.config = new
        self._limits = _limits(new)
        for budget in self._memory.values():
            budget.limit = new.proxy.replica_memory  # (checked at the next measurement)
        self.protocols.reconfigure(new)
        if new.proxy.protocol != old.proxy.protocol or new.protocols != old.protocols:
            self._learn_rules()
        if new.proxy.mode != old.proxy.mode or new.proxy.replica_flush != old.proxy.replica_flush:
            self._flusher = _flusher(new)  # for new sessions; live ones keep theirs
        changes += tls()
        old_checker = self.health
        self.health = self._new_health_checker()
        for n, state in old_checker.states.items():
            if n in self.health.states and n not in moved:
                self.health.states[n] = state
        old_checker.cancel()
        if self.started.is_set():
            self.health.start()
        self._publish_view()
        return changes

    def _reload_tls(self, new: Config) -> Callable[[], list[str]]:
        """Read every TLS file of ``new`` again (a certificate renewed in place is new);
        return what puts them in use, for when the rest of the reload is done.

        Raises ControlError, using none of them, when one cannot be used. Whether the
        client listener or the admin API speaks TLS at all is settled at start.
        """
        for section, now, live in (
            ("proxy", new.proxy.tls_cert, self._tls is not None),
            ("admin", new.admin.tls_cert, self._admin_tls is not None),
        ):
            if bool(now) != live:
                log.warning(
                    "reload: %s.tls_cert turns TLS %s at the next restart",
                    section,
                    "on" if now else "off",
                )
        try:
            backends = _backend_tls(new)
            client = _client_tls(new) if self._tls is not None else None
            admin = _admin_tls(new) if self._admin_tls is not None else None
        except TlsFileError as exc:
            raise ControlError(400, f"TLS: {exc.message}") from None

        def use() -> list[str]:
            done = []
            self._backend_tls = backends
            if backends:
                done.append(f"TLS files of {', '.join(backends)} re-read (new connections)")
            if self._tls is not None and client is not None:
                self._tls.context = client
                done.append("TLS for clients: files re-read (new connections)")
            if self._admin_tls is not None and admin is not None:
                # aiohttp's listener keeps its context: the new pair goes into it.
                try:
                    reload_pair(self._admin_tls, new.admin.tls_cert, new.admin.tls_key)
                    done.append("admin API TLS: files re-read")
                except TlsFileError as exc:  # changed again since a moment ago
                    log.error("reload: admin API TLS kept as it was: %s", exc.message)
            return done

        return use

    def _known(self, name: str) -> Backend:
        b = self.backends.get(name)
        if b is None:
            raise ControlError(404, f"no backend named {name!r}")
        if b.config.role == "shadow":
            raise ControlError(409, f"{name!r} is a shadow: shadows are never promoted")
        return b

    async def promote(self, name: str) -> dict[str, Any]:
        """Planned switchover: new sessions go to ``name``; live ones finish where they are."""
        self._known(name)
        try:
            stored = await self._change(
                lambda view: view.promote(name, old_primary_missed_input=False),
                lambda old, new: f"switchover by the operator: {old.primary} -> {name}",
                kind="failover",
                backend=name,
            )
        except IllegalTransition as exc:
            raise ControlError(409, str(exc)) from None
        if not stored:
            raise ControlError(503, "the new view could not be stored: see the proxy's log")
        self.metrics.failovers.labels("manual").inc()
        return self.status()

    async def mark_synced(self, name: str) -> dict[str, Any]:
        """The operator copied the primary's data to ``name``: it may be promoted again."""
        self._known(name)
        try:
            stored = await self._change(
                lambda view: view.mark_synced(name),
                f"{name} marked in sync by the operator",
                kind="synced",
                backend=name,
            )
        except IllegalTransition as exc:
            raise ControlError(409, str(exc)) from None
        if not stored:
            raise ControlError(503, "the new view could not be stored: see the proxy's log")
        return self.status()

    def report(self, kind: str, name: str, detail: str, sid: int) -> None:
        if kind in ("key", "own_key"):
            key = bytes.fromhex(detail)
            if kind == "key" and len(self._client_keys) < MAX_CANCEL_KEYS:
                self._client_keys[key] = sid
            self._backend_keys.setdefault(sid, {})[name] = key
            return
        if kind == "allowed":
            # Replies that differed as the rules allow (detail: the request): counted only.
            self._backend(name).allowed += 1
            self.metrics.allowed_differences.labels(name, self._request_label(detail)).inc()
            return
        if kind == "divergence":
            self._event("divergence", name, f"session {sid}: {detail}")
            self._backend(name).divergences += 1
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
                self._backend(name).config.address,
                detail,
            )
        elif kind == "dropped":
            self.metrics.dropped.labels(name).inc()
            log.warning("session %d: %s left the session: %s", sid, name, detail)
        elif kind in ("takeover", "closed"):
            log.warning("session %d: %s: %s", sid, name, detail)
        else:
            log.info("session %d: %s %s: %s", sid, kind, name, detail)

    def check_alive(self, name: str, answer: Callable[[bool, str], None]) -> None:
        """Does ``name`` still accept connections? One check at a time per backend,
        its answer for every session that asked meanwhile."""
        if self.health.health(name) == "down":
            answer(False, f"its health checks fail ({self.health.last_error.get(name, 'down')})")
            return
        waiting = self._alive_checks.get(name)
        if waiting is not None:
            waiting.append(answer)
            return
        self._alive_checks[name] = [answer]
        asyncio.get_running_loop().create_task(self._check_alive(name), name=f"alive:{name}")

    async def _check_alive(self, name: str) -> None:
        error: str | None = "not configured any more"
        check = self.config.health
        judge = None
        if not check.send and not check.expect:
            # What "alive" means where the health checks do not say: it accepts a
            # connection, and, for a protocol, answers one of its requests.
            send, expect = self.protocols.liveness()
            check = replace(check, send=send, expect=expect)
            judge = self.protocols.judge()
        try:
            address = self._backend(name).config.address
            tls = self.tls_of(name)
            error = await probe(address, check, tls, judge)
            if error is None:
                await asyncio.sleep(ALIVE_RECHECK)
                error = await probe(address, check, tls, judge)
        except KeyError:
            pass
        finally:
            answers = self._alive_checks.pop(name, [])
        # This machine's own shortage says nothing about the backend: not a failover.
        alive = error is None or error == LOCAL_FAILURE
        for answer in answers:
            try:
                answer(alive, error or "it accepts connections")
            except Exception:
                log.exception("answering a check of %s failed", name)

    def _request_label(self, request: str) -> str:
        """A request as a metric label, from a bounded set: its command (``GET``,
        ``CLIENT ID``, ``SELECT``), never its target or its text (an HTTP path or SQL
        would make a series per request); past MAX_REQUEST_LABELS of them, ``other``."""
        words = request.split(None, 2)
        if not words:
            return "other"
        label = words[0].strip("'\"").upper()[:24]
        if len(words) > 1 and words[1].isalpha() and words[1].isupper():
            label += " " + words[1][:24]  # (a subcommand: CLIENT ID, COMMAND DOCS)
        if label not in self._request_labels:
            if len(self._request_labels) >= MAX_REQUEST_LABELS:
                return "other"
            self._request_labels.add(label)
        return label

    def cancel(self, key: bytes, peer: str) -> None:
        """A client's PostgreSQL CancelRequest for ``key`` (the one it got at login):
        carried out on every backend of that session, each with that backend's own
        key. A key no session holds is dropped, as PostgreSQL does."""
        sid = self._client_keys.get(key)
        keys = dict(self._backend_keys.get(sid, {})) if sid is not None else {}
        if not keys:
            self._ratelimit.log(
                log, logging.INFO, "cancel", "cancel request from %s: no session has its key", peer
            )
            return
        log.info("session %d: cancel request from %s, sent to %s", sid, peer, ", ".join(keys))
        for name, own in keys.items():
            with contextlib.suppress(KeyError):
                address = self._backend(name).config.address
                self._spawn(self._send_cancel(name, address, own), f"cancel-{sid}-{name}")

    async def _send_cancel(self, name: str, address: Address, key: bytes) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.config.proxy.connect_timeout):
                reader, writer = await asyncio.open_connection(address.host, address.port)
                writer.write(postgres.cancel_request(key))
                await reader.read(1)  # (the server closes once it has read the request)
        except (OSError, TimeoutError) as exc:
            log.warning("cancel request to %s (%s) failed: %s", name, address, describe_error(exc))
        finally:
            if writer is not None:
                writer.close()

    def _learn_rules(self) -> None:
        """Read the primary's own rules for its commands (protocol resp), in the background."""
        if not self.protocols.wants_tips() or self._listener is None:
            return
        if self._learning is not None and not self._learning.done():
            self._learning.cancel()
        primary = self.view.primary
        address = self._backend(primary).config.address
        timeout = self.config.proxy.connect_timeout + self.config.health.timeout
        self._learning = asyncio.get_running_loop().create_task(
            self.protocols.learn(primary, address, timeout, self.tls_of(primary)),
            name="learn-rules",
        )

    def session_finished(self, driver: SessionDriver, outcome: str) -> None:
        self.sessions.discard(driver)
        self._by_sid.pop(driver.sid, None)
        keys = self._backend_keys.pop(driver.sid, None)
        if keys:
            for key in keys.values():
                if self._client_keys.get(key) == driver.sid:
                    del self._client_keys[key]
        if not self.sessions:
            self._idle.set()
        metrics = self.metrics
        metrics.sessions_active.value -= 1
        self._account(driver, last=True)
        s = driver.session
        duration = time.monotonic() - driver.started
        metrics.session_duration.observe(duration)
        if s.takeovers and outcome == "ok":
            outcome = "takeover"
        elif outcome in ("refused", "overloaded"):
            # No primary could be had, or this machine ran out of descriptors.
            metrics.refused.labels("no_primary" if outcome == "refused" else outcome).inc()
        access = self._access_log
        if not access.enabled():
            return
        members = s.members
        message = (
            f"session {driver.sid} client={driver.peer} duration={duration:.3f}s "
            f"from_client={s.received} to_client={s.delivered} backends={','.join(members)} "
            f"outcome={outcome}"
        )
        if s.promoted:
            message += f" promoted={s.promoted}"
        if s.takeovers:
            message += f" takeovers={s.takeovers}"
        if access.log_text(message):
            return  # (the text line shows no fields: none are made)
        access.log(
            message,
            {
                "session": driver.sid,
                "client": driver.peer,
                "duration": round(duration, 6),
                "from_client": s.received,
                "to_client": s.delivered,
                "backends": members,
                "outcome": outcome,
            },
        )

    # ------------------------------------------------------ byte accounting

    def _account(self, driver: SessionDriver, *, last: bool = False) -> None:
        """Add what a session moved since it was last counted to the totals.

        ``last``: the session ended; nothing of it is kept for the next count.
        """
        driver.settle()
        s = driver.session
        if last:
            seen = self._reported.pop(driver, None) or _NOTHING_SEEN
        else:
            seen = self._reported.setdefault(driver, {})
        for name in s.members:
            to_now, from_now = s.fed(name) - s.held(name), s.out(name)
            to_was, from_was = seen.get(name, (0, 0))
            if to_now != to_was or from_now != from_was:
                if not last:
                    seen[name] = (to_now, from_now)
                b = self._backend(name)
                b.bytes_to += to_now - to_was
                b.bytes_from += from_now - from_was
                to_backend, from_backend = self.metrics.bytes_of(name)
                to_backend.value += to_now - to_was
                from_backend.value += from_now - from_was
        received, delivered = s.received, s.delivered
        in_was, out_was = seen.get(CLIENT, (0, 0))
        if received != in_was or delivered != out_was:
            if not last:
                seen[CLIENT] = (received, delivered)
            self._client_bytes["from_client"] += received - in_was
            self._client_bytes["to_client"] += delivered - out_was
            from_client, to_client = self.metrics.client_bytes_of()
            from_client.value += received - in_was
            to_client.value += delivered - out_was

    async def _tick(self) -> None:
        """Once a second: byte totals of live sessions, each backend's lag, and what each
        session holds for each backend measured again (input a write buffer held at the
        last batch may have gone out since: the memory budgets follow)."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            lag = dict.fromkeys(self.backends, 0)
            for driver in list(self.sessions):
                self._account(driver)
                s = driver.session
                for name in s.members:
                    pending = driver.measure(name)
                    if name in lag and s.in_session(name):
                        lag[name] += pending
            for name, pending in lag.items():
                self.backends[name].lag = pending
                self.metrics.replica_lag.labels(name).set(pending)
                self.metrics.held.labels(name).set(self._held(name))
