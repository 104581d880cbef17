"""Prometheus metrics, kept apart from logging (STYLE.md 8).

Counters on the data path are not touched per chunk: the server adds each
session's byte counts once a second and when the session ends.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Connect times from 100 us (loopback) to 2 s (the default connect_timeout).
CONNECT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
#: Session lengths from a request (10 ms) to a day-long connection.
DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600, 14400, 86400)


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
            "Client connections closed at once, by reason (max_connections, min_in_sync, "
            "no_primary, acl)",
            ["reason"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "replicaproxy_tls_handshake_failures",
            "Client connections closed because their TLS handshake failed, by reason "
            "(not_tls, version, no_client_cert, bad_client_cert, cert_refused, timeout, "
            "closed, other)",
            ["reason"],
            registry=r,
        )
        self.divergences = Counter(
            "replicaproxy_divergences",
            "Sessions in which a backend's output differed from the primary's",
            ["backend"],
            registry=r,
        )
        self.allowed_differences = Counter(
            "replicaproxy_allowed_differences",
            "Replies of a backend that differed from the primary's as the protocol's rules "
            "allow (an INFO, a set in another order), by request",
            ["backend", "request"],
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
        self.store_up = Gauge(
            "replicaproxy_store_up",
            "1 while the view store answers and this proxy holds its lease there, else 0",
            registry=r,
        )
        self.view_changes = Counter(
            "replicaproxy_view_changes",
            "Views adopted, by who stored them (local: this proxy; peer: another proxy)",
            ["source"],
            registry=r,
        )
        self.proxies = Gauge(
            "replicaproxy_proxies",
            "Proxies registered in the view store, this one included (1 with a state file)",
            registry=r,
        )
        self.replica_lag = Gauge(
            "replicaproxy_replica_lag_bytes",
            "Input accepted for a backend but not yet handed to its socket, over all sessions",
            ["backend"],
            registry=r,
        )
        self.held = Gauge(
            "replicaproxy_held_bytes",
            "Input held in the proxy for a replica or shadow over all its sessions, closing "
            "connections included: what replica_memory bounds",
            ["backend"],
            registry=r,
        )
        self.connect_time = Histogram(
            "replicaproxy_connect_seconds",
            "Time to connect to a backend",
            ["backend"],
            buckets=CONNECT_BUCKETS,
            registry=r,
        )
        self.session_duration = Histogram(
            "replicaproxy_session_duration_seconds",
            "Length of client sessions",
            buckets=DURATION_BUCKETS,
            registry=r,
        )

    def forget_backend(self, name: str) -> None:
        """Drop the per-backend series of a backend removed from the config."""
        for metric in (
            self.divergences,
            self.dropped,
            self.connect_failures,
            self.backend_in_sync,
            self.backend_up,
            self.replica_lag,
            self.held,
            self.connect_time,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(name)
        for labels in list(self.allowed_differences._metrics):
            if labels[0] == name:
                self.allowed_differences.remove(*labels)
        for direction in ("to_backend", "from_backend"):
            with contextlib.suppress(KeyError):
                self.bytes.remove(name, direction)
