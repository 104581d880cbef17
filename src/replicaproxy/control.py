"""What the admin API may ask of a running proxy, and how it can fail.

The admin HTTP layer and ``ctl`` talk to the proxy only through this
interface; they never reach into sessions (DESIGN.md "Layout").
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

#: What a request that changes the view answers: at once, or once the store has the change
#: (a network store answers in its own time).
Answer = dict[str, Any] | Awaitable[dict[str, Any]]


class ControlError(Exception):
    """A request the proxy refuses; ``status`` is the HTTP code that fits."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Control(Protocol):
    """The proxy as the admin API sees it."""

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry with every replicaproxy metric."""
        ...

    def status(self) -> dict[str, Any]:
        """The view and the backends, as ``GET /status`` returns them.

        ``{"epoch": 1, "primary": "NAME", "mode": "async", "clean": false,
        "last_stop": "clean|unclean|none", "uptime": 12.5, "sessions_active": 3,
        "sessions_total": 40,
        "client_bytes": {"from_client": 0, "to_client": 0},
        "backends": [{"name": "NAME", "address": "HOST:PORT",
        "role": "primary|replica|shadow", "state": "in_sync|stale",
        "health": "up|down|unknown", "sessions": 0, "divergences": 0,
        "bytes_to": 0, "bytes_from": 0, "lag_bytes": 0, "held_bytes": 0,
        "memory_budget": 67108864}],
        "store": {"kind": "file|etcd", "endpoints": ["HOST:PORT"], "up": true,
        "revision": 7, "name": "THIS PROXY", "on_store_loss": "stop|serve",
        "fenced": false, ...}, "proxies": [{"name": "NAME", "listen": "HOST:PORT",
        "admin": "HOST:PORT", "version": "0.1.0", "started": 1764201600.0,
        "self": true}]}``. Byte counts are
        cumulative (the status page turns them into rates); ``lag_bytes`` is
        input accepted for that backend but not yet handed to its socket (in the
        sessions it takes part in, once a second); ``held_bytes`` is the input held
        for it over all sessions, closing connections included, which
        ``memory_budget`` (``replica_memory``; null for the primary) bounds.
        """
        ...

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """Recent events with ``id > since``, oldest first (at most the last 200).

        Each: ``{"id": 7, "time": 1764201600.5 (unix seconds), "kind":
        "failover|stale|synced|divergence|health|reload|drain|peer|store|memory",
        "backend": "NAME" or None, "epoch": 3, "message": "..."}``.
        """
        ...

    def reload(self) -> Answer:
        """Re-read the config file (as SIGHUP does); returns ``{"ok": true, "changes":
        [...]}``. ControlError(400) with the config's errors when it is rejected
        (the old config stays), ControlError(409) when there is no file to read.
        """
        ...

    def drain(self) -> dict[str, Any]:
        """Stop accepting, let open sessions finish, then exit; returns
        ``{"draining": true, "sessions": N}``."""
        ...

    def promote(self, name: str) -> Answer:
        """Planned switchover to the in-sync replica ``name``; returns the new status.

        Raises ControlError(404) for an unknown backend, ControlError(409) when
        the move is not allowed (stale, a shadow, already primary), and
        ControlError(503) when the new view cannot be stored.
        """
        ...

    def mark_synced(self, name: str) -> Answer:
        """The operator says ``name`` has the primary's data; returns the new status.

        Errors as for :meth:`promote`.
        """
        ...
