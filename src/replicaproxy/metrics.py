"""Prometheus metrics, kept apart from logging (STYLE.md 8).

Counters on the data path are not touched per chunk: sessions keep their own
byte counts and add them here when they end.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    """Every metric replicaproxy exports, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sessions = Counter("replicaproxy_sessions", "Client sessions accepted", registry=r)
        self.sessions_active = Gauge(
            "replicaproxy_sessions_active", "Client sessions now open", registry=r
        )
        self.bytes = Counter(
            "replicaproxy_bytes",
            "Bytes moved, by backend and direction (to_backend, from_backend)",
            ["backend", "direction"],
            registry=r,
        )
        self.client_bytes = Counter(
            "replicaproxy_client_bytes",
            "Bytes moved between clients and the proxy (from_client, to_client)",
            ["direction"],
            registry=r,
        )
        self.refused = Counter(
            "replicaproxy_refused",
            "Client connections closed at once, by reason",
            ["reason"],
            registry=r,
        )
        self.divergences = Counter(
            "replicaproxy_divergences",
            "Sessions in which a backend's output differed from the primary's",
            ["backend"],
            registry=r,
        )
        self.dropped = Counter(
            "replicaproxy_dropped",
            "Times a replica or shadow left a session early (overflow, error)",
            ["backend"],
            registry=r,
        )
        self.connect_failures = Counter(
            "replicaproxy_connect_failures",
            "Failed connections to a backend",
            ["backend"],
            registry=r,
        )
        self.backend_in_sync = Gauge(
            "replicaproxy_backend_in_sync",
            "1 while the backend has missed no input",
            ["backend"],
            registry=r,
        )
        self.backend_up = Gauge(
            "replicaproxy_backend_up",
            "1 when the health check sees the backend up, 0 when down, -1 before the first check",
            ["backend"],
            registry=r,
        )
        self.failovers = Counter(
            "replicaproxy_failovers",
            "Primary changes, by kind (connect, midsession, health, manual)",
            ["kind"],
            registry=r,
        )
        self.epoch = Gauge("replicaproxy_epoch", "Epoch of the current view", registry=r)
