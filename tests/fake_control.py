"""An in-memory ``Control`` for testing the admin API and ``ctl`` without a proxy."""

from __future__ import annotations

import asyncio
import copy
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from replicaproxy.admin import AdminServer
from replicaproxy.config import Address
from replicaproxy.control import Control, ControlError

#: Name of the one metric in the fake's registry, as /metrics shows it.
METRIC = "replicaproxy_fake_sessions_total"

#: Events the fake keeps, as the real proxy does (Control.events: "at most the last 200").
EVENTS_KEPT = 200

#: The bound on any wait of ``serve_in_thread`` (server start/stop, its thread to finish).
WAIT = 10.0

#: When the fake's first event happened (unix seconds): 2025-11-27 00:00:00 UTC.
T0 = 1764201600.0


@dataclass
class FakeBackend:
    """One backend of the fake view."""

    name: str
    address: str
    role: str  # primary | replica | shadow
    state: str = "in_sync"  # in_sync | stale
    health: str = "up"
    sessions: int = 0
    divergences: int = 0
    bytes_to: int = 0
    bytes_from: int = 0
    lag_bytes: int = 0


@dataclass
class FakeReload:
    """What the fake's ``reload`` does: fail with ``error`` (ControlError(400), as a rejected
    config), or say there is no file (``no_file``: 409), or report ``changes``."""

    changes: list[str] = field(default_factory=lambda: ["added shadow canary2 (127.0.0.1:7005)"])
    error: str = ""
    no_file: bool = False
    calls: int = 0


class FakeControl:
    """A tiny view (epoch, primary, backends) with the promote / mark-synced rules.

    ``broken`` makes ``status`` raise RuntimeError (a bug in the proxy); ``store_fails``
    makes a change fail with ControlError(503) as if the state file could not be written.
    ``legacy_status`` answers ``status`` without the fields added for the status page (as a
    proxy from before them would). Every change is kept as an event (see ``add_event``);
    ``reload_with`` decides what ``reload`` does; ``drain`` only sets ``draining``.
    """

    def __init__(self) -> None:
        self.epoch = 1
        self.primary = "mv1"
        self.backends = [
            FakeBackend(
                "mv1", "127.0.0.1:7001", "primary", sessions=2, bytes_to=5000, bytes_from=1200
            ),
            FakeBackend(
                "mv2", "127.0.0.1:7002", "replica", bytes_to=5000, bytes_from=1200, lag_bytes=0
            ),
            FakeBackend("mv3", "127.0.0.1:7003", "replica", state="stale", health="down"),
            FakeBackend(
                "canary",
                "127.0.0.1:7004",
                "shadow",
                divergences=1,
                bytes_to=3 * 1024 * 1024,
                bytes_from=1536,
                lag_bytes=2048,
            ),
        ]
        self.broken = False
        self.store_fails = False
        self.legacy_status = False
        self.draining = False
        self.reload_with = FakeReload()
        self.event_log: list[dict[str, Any]] = []
        self._clock = T0
        self.add_event("health", "mv3", "mv3 is down: connection refused")
        self.add_event("stale", "mv3", "health check saw it down; it may restart empty")
        self._registry = CollectorRegistry()
        self.sessions = Counter(
            "replicaproxy_fake_sessions", "Sessions accepted (fake)", registry=self._registry
        )
        self.sessions.inc(3)

    def add_event(self, kind: str, backend: str | None, message: str) -> dict[str, Any]:
        """Keep an event, one fake second after the previous one; return it."""
        event = {
            "id": self.event_log[-1]["id"] + 1 if self.event_log else 1,
            "time": self._clock,
            "kind": kind,
            "backend": backend,
            "epoch": self.epoch,
            "message": message,
        }
        self._clock += 1.0
        self.event_log.append(event)
        del self.event_log[:-EVENTS_KEPT]
        return event

    @property
    def registry(self) -> CollectorRegistry:
        """The fake's registry: one counter."""
        return self._registry

    def status(self) -> dict[str, Any]:
        """The view in the documented ``GET /status`` shape."""
        if self.broken:
            raise RuntimeError("fake control is broken")
        legacy_keys = ("name", "address", "role", "state", "health", "sessions")
        backends = [
            {
                "name": b.name,
                "address": b.address,
                "role": b.role,
                "state": b.state,
                "health": b.health,
                "sessions": b.sessions,
                "divergences": b.divergences,
                "bytes_to": b.bytes_to,
                "bytes_from": b.bytes_from,
                "lag_bytes": b.lag_bytes,
            }
            for b in self.backends
        ]
        if self.legacy_status:
            return {
                "epoch": self.epoch,
                "primary": self.primary,
                "mode": "async",
                "backends": [{key: b[key] for key in legacy_keys} for b in backends],
            }
        return {
            "epoch": self.epoch,
            "primary": self.primary,
            "mode": "async",
            "clean": False,
            "last_stop": "clean",
            "uptime": 3725.5,
            "sessions_active": sum(b.sessions for b in self.backends if b.role == "primary"),
            "sessions_total": 40,
            "client_bytes": {"from_client": 5000, "to_client": 1200},
            "backends": backends,
        }

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The kept events with ``id > since``, oldest first."""
        return [dict(e) for e in self.event_log if e["id"] > since]

    def reload(self) -> dict[str, Any]:
        """Do what ``reload_with`` says, keeping a ``reload`` event either way."""
        self.reload_with.calls += 1
        if self.reload_with.no_file:
            raise ControlError(409, "nothing to reload: the proxy was started without --config")
        if self.reload_with.error:
            message = f"reload rejected, the running config is kept: {self.reload_with.error}"
            self.add_event("reload", None, f"rejected: {self.reload_with.error}")
            raise ControlError(400, message)
        changes = list(self.reload_with.changes)
        self.add_event("reload", None, "; ".join(changes) or "nothing changed")
        return {"ok": True, "changes": changes}

    def drain(self) -> dict[str, Any]:
        """Start draining (once); the sessions of the primary are the open ones."""
        sessions = sum(b.sessions for b in self.backends if b.role == "primary")
        if not self.draining:
            self.draining = True
            self.add_event("drain", None, f"draining: {sessions} sessions open")
        return {"draining": True, "sessions": sessions}

    def snapshot(self) -> tuple[int, str, list[FakeBackend], bool, int, int]:
        """Everything a change could touch, to check that a refused request changed nothing."""
        return (
            self.epoch,
            self.primary,
            copy.deepcopy(self.backends),
            self.draining,
            self.reload_with.calls,
            len(self.event_log),
        )

    def promote(self, name: str) -> dict[str, Any]:
        """Switch over to the in-sync replica ``name``."""
        backend = self._find(name)
        if backend.role == "primary":
            raise ControlError(409, f"backend {name!r} is already the primary")
        if backend.role == "shadow":
            raise ControlError(409, f"backend {name!r} is a shadow and is never promoted")
        if backend.state != "in_sync":
            raise ControlError(409, f"backend {name!r} is stale and cannot be promoted")
        self._store()
        old = self.primary
        self._find(self.primary).role = "replica"
        backend.role = "primary"
        self.primary = name
        self.epoch += 1
        self.add_event("failover", name, f"switchover by the operator: {old} -> {name}")
        return self.status()

    def mark_synced(self, name: str) -> dict[str, Any]:
        """Mark the stale replica ``name`` in sync."""
        backend = self._find(name)
        if backend.role != "replica":
            raise ControlError(409, f"backend {name!r} is a {backend.role}, not a replica")
        if backend.state == "in_sync":
            raise ControlError(409, f"backend {name!r} is already in sync")
        self._store()
        backend.state = "in_sync"
        self.epoch += 1
        self.add_event("synced", name, f"{name} marked in sync by the operator")
        return self.status()

    def _find(self, name: str) -> FakeBackend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise ControlError(404, f"no backend named {name!r}")

    def _store(self) -> None:
        if self.store_fails:
            raise ControlError(503, "cannot store the new view: disk full (fake)")


@contextmanager
def serve_in_thread(
    control: Control, token: str = "", tls: ssl.SSLContext | None = None
) -> Iterator[str]:
    """Serve ``control``'s admin API on 127.0.0.1, a free port, from a background thread
    (over HTTPS with ``tls``).

    Yields ``HOST:PORT``. A thread of its own, because the clients that use it (``ctl``'s
    urllib calls, a browser driven by Playwright's sync API) block: run on the test's event
    loop, they would wait forever for a server that cannot answer.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="admin-api", daemon=True)
    thread.start()
    server = AdminServer(control, Address("127.0.0.1", 0), token=token, tls=tls)
    try:
        address = asyncio.run_coroutine_threadsafe(server.start(), loop).result(WAIT)
        yield str(address)
    finally:
        try:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(WAIT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(WAIT)
            loop.close()
