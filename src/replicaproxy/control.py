"""What the admin API may ask of a running proxy, and how it can fail.

The admin HTTP layer and ``ctl`` talk to the proxy only through this
interface; they never reach into sessions (DESIGN.md "Layout").
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry


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

        ``{"epoch": 1, "primary": "NAME", "mode": "async", "backends": [{"name":
        "NAME", "address": "HOST:PORT", "role": "primary|replica|shadow",
        "state": "in_sync|stale", "health": "up|down|unknown", "sessions": 0}]}``
        """
        ...

    def promote(self, name: str) -> dict[str, Any]:
        """Planned switchover to the in-sync replica ``name``; returns the new status.

        Raises ControlError(404) for an unknown backend, ControlError(409) when
        the move is not allowed (stale, a shadow, already primary), and
        ControlError(503) when the new view cannot be stored.
        """
        ...

    def mark_synced(self, name: str) -> dict[str, Any]:
        """The operator says ``name`` has the primary's data; returns the new status.

        Errors as for :meth:`promote`.
        """
        ...
