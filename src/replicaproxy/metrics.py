"""Prometheus metrics, kept apart from logging (STYLE.md 8).

Counters on the data path are not touched per chunk: the server adds each
session's byte counts once a second and when the session ends. What every
session moves (sessions, bytes, connect and session times) is counted in plain
numbers (:class:`SessionMetrics`) and read when scraped.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

#: How prometheus_client writes a bucket's bound (``le``): ``+Inf``, ``0.0001``, ``86400.0``.
_le = cast(Callable[[float], str], floatToGoString)

#: Connect times from 100 us (loopback) to 2 s (the default connect_timeout).
CONNECT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
#: Session lengths from a request (10 ms) to a day-long connection.
DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600, 14400, 86400)


class Count:
    """A counter (or, with ``dec``, a gauge) as a plain number."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class Buckets:
    """A histogram as plain numbers: how many values fell in each bucket, and their sum."""

    __slots__ = ("bounds", "counts", "created", "labels", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.labels = [_le(b) for b in (*bounds, float("inf"))]
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # (value <= its bound)

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for label, n in zip(self.labels, self.counts, strict=True):
            total += n
            out.append((label, float(total)))
        return out


class SessionMetrics:
    """The metrics every session moves, counted in plain numbers, read when scraped.

    ``prometheus_client``'s classes take a lock and check their labels on every
    change; with the nine changes a short session makes that was more work than
    the session's own bookkeeping. A collector in the registry turns these numbers
    into the same series (``_total``, ``_created``, ``_bucket``...) as they would.
    """

    def __init__(self) -> None:
        self.sessions = Count()
        self.sessions_active = Count()
        self.session_duration = Buckets(DURATION_BUCKETS)
        self.bytes: dict[tuple[str, ...], Count] = {}  # (backend, direction)
        self.client_bytes: dict[str, Count] = {}
        self.connect_time: dict[str, Buckets] = {}

    def collect(self) -> Iterator[Metric]:
        yield _counter("replicaproxy_sessions", "Client sessions accepted", [], {(): self.sessions})
        active = GaugeMetricFamily("replicaproxy_sessions_active", "Client sessions now open")
        active.add_metric([], self.sessions_active.value)
        yield active
        yield _counter(
            "replicaproxy_bytes",
            "Bytes moved, by backend and direction (to_backend, from_backend)",
            ["backend", "direction"],
            self.bytes,
        )
        yield _counter(
            "replicaproxy_client_bytes",
            "Bytes moved between clients and the proxy (from_client, to_client)",
            ["direction"],
            {(d,): c for d, c in self.client_bytes.items()},
        )
        yield _histogram(
            "replicaproxy_connect_seconds",
            "Time to connect to a backend",
            ["backend"],
            {(b,): h for b, h in self.connect_time.items()},
        )
        yield _histogram(
            "replicaproxy_session_duration_seconds",
            "Length of client sessions",
            [],
            {(): self.session_duration},
        )


def _counter(
    name: str, doc: str, labels: list[str], series: dict[tuple[str, ...], Count]
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, count in series.items():
        family.add_metric(list(values), count.value, created=count.created)
    return family


def _histogram(
    name: str, doc: str, labels: list[str], series: dict[tuple[str, ...], Buckets]
) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in series.items():
        family.add_metric(list(values), h.cumulative(), h.sum)
        family.add_sample(name + "_created", dict(zip(labels, values, strict=True)), h.created)
    return family


class Metrics:
    """Every metric replicaproxy exports, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.per_session = SessionMetrics()
        r.register(self.per_session)
        self.sessions = self.per_session.sessions
        self.sessions_active = self.per_session.sessions_active
        self.session_duration = self.per_session.session_duration
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

    def bytes_of(self, name: str) -> tuple[Count, Count]:
        """``bytes{backend=name}``'s to_backend and from_backend series."""
        series = self.per_session.bytes
        to = series.get((name, "to_backend"))
        if to is None:
            to = series[(name, "to_backend")] = Count()
            series[(name, "from_backend")] = Count()
        return to, series[(name, "from_backend")]

    def connect_time_of(self, name: str) -> Buckets:
        """``connect_seconds{backend=name}``."""
        series = self.per_session.connect_time.get(name)
        if series is None:
            series = self.per_session.connect_time[name] = Buckets(CONNECT_BUCKETS)
        return series

    def client_bytes_of(self) -> tuple[Count, Count]:
        """``client_bytes``'s from_client and to_client series."""
        series = self.per_session.client_bytes
        if not series:
            series["from_client"] = Count()
            series["to_client"] = Count()
        return series["from_client"], series["to_client"]

    def forget_backend(self, name: str) -> None:
        """Drop the per-backend series of a backend removed from the config."""
        self.per_session.bytes.pop((name, "to_backend"), None)
        self.per_session.bytes.pop((name, "from_backend"), None)
        self.per_session.connect_time.pop(name, None)
        for metric in (
            self.divergences,
            self.dropped,
            self.connect_failures,
            self.backend_in_sync,
            self.backend_up,
            self.replica_lag,
            self.held,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(name)
        for labels in list(self.allowed_differences._metrics):
            if labels[0] == name:
                self.allowed_differences.remove(*labels)
