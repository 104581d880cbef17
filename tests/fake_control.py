"""An in-memory ``Control`` for testing the admin API and ``ctl`` without a proxy."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from replicaproxy.control import ControlError

#: Name of the one metric in the fake's registry, as /metrics shows it.
METRIC = "replicaproxy_fake_sessions_total"


@dataclass
class FakeBackend:
    """One backend of the fake view."""

    name: str
    address: str
    role: str  # primary | replica | shadow
    state: str = "in_sync"  # in_sync | stale
    health: str = "up"
    sessions: int = 0


class FakeControl:
    """A tiny view (epoch, primary, backends) with the promote / mark-synced rules.

    ``broken`` makes ``status`` raise RuntimeError (a bug in the proxy); ``store_fails``
    makes a change fail with ControlError(503) as if the state file could not be written.
    """

    def __init__(self) -> None:
        self.epoch = 1
        self.primary = "mv1"
        self.backends = [
            FakeBackend("mv1", "127.0.0.1:7001", "primary", sessions=2),
            FakeBackend("mv2", "127.0.0.1:7002", "replica"),
            FakeBackend("mv3", "127.0.0.1:7003", "replica", state="stale", health="down"),
            FakeBackend("canary", "127.0.0.1:7004", "shadow"),
        ]
        self.broken = False
        self.store_fails = False
        self._registry = CollectorRegistry()
        self.sessions = Counter(
            "replicaproxy_fake_sessions", "Sessions accepted (fake)", registry=self._registry
        )
        self.sessions.inc(3)

    @property
    def registry(self) -> CollectorRegistry:
        """The fake's registry: one counter."""
        return self._registry

    def status(self) -> dict[str, Any]:
        """The view in the documented ``GET /status`` shape."""
        if self.broken:
            raise RuntimeError("fake control is broken")
        return {
            "epoch": self.epoch,
            "primary": self.primary,
            "mode": "async",
            "backends": [
                {
                    "name": b.name,
                    "address": b.address,
                    "role": b.role,
                    "state": b.state,
                    "health": b.health,
                    "sessions": b.sessions,
                }
                for b in self.backends
            ],
        }

    def snapshot(self) -> tuple[int, str, list[FakeBackend]]:
        """Everything a change could touch, to check that a refused request changed nothing."""
        return self.epoch, self.primary, copy.deepcopy(self.backends)

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
        self._find(self.primary).role = "replica"
        backend.role = "primary"
        self.primary = name
        self.epoch += 1
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
        return self.status()

    def _find(self, name: str) -> FakeBackend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise ControlError(404, f"no backend named {name!r}")

    def _store(self) -> None:
        if self.store_fails:
            raise ControlError(503, "cannot store the new view: disk full (fake)")
