"""The per-session metrics, kept as plain numbers, read as prometheus_client's own would be."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from replicaproxy.metrics import CONNECT_BUCKETS, DURATION_BUCKETS, Metrics


def text(registry: CollectorRegistry, names: tuple[str, ...]) -> list[str]:
    """The registry's lines of the families ``names``, creation times left out."""
    lines = generate_latest(registry).decode().splitlines()
    return sorted(
        re.sub(r"_created(\{.*\})? .*", r"_created\1 T", line)
        for line in lines
        if any(n in line for n in names)
    )


def test_session_metrics_read_as_prometheus_clients_own() -> None:
    ours = Metrics()
    theirs = CollectorRegistry()
    sessions = Counter("replicaproxy_sessions", "Client sessions accepted", registry=theirs)
    active = Gauge("replicaproxy_sessions_active", "Client sessions now open", registry=theirs)
    moved = Counter(
        "replicaproxy_bytes",
        "Bytes moved, by backend and direction (to_backend, from_backend)",
        ["backend", "direction"],
        registry=theirs,
    )
    client = Counter(
        "replicaproxy_client_bytes",
        "Bytes moved between clients and the proxy (from_client, to_client)",
        ["direction"],
        registry=theirs,
    )
    connect = Histogram(
        "replicaproxy_connect_seconds",
        "Time to connect to a backend",
        ["backend"],
        buckets=CONNECT_BUCKETS,
        registry=theirs,
    )
    duration = Histogram(
        "replicaproxy_session_duration_seconds",
        "Length of client sessions",
        buckets=DURATION_BUCKETS,
        registry=theirs,
    )
    for i, seconds in enumerate((0.0001, 0.00005, 0.003, 2.0, 7.5, 0.5, 86400.0, 1e6)):
        ours.sessions.inc()
        sessions.inc()
        ours.sessions_active.inc()
        active.inc()
        if i % 3 == 0:
            ours.sessions_active.dec()
            active.dec()
        name = "p" if i % 2 else "r"
        to, back = ours.bytes_of(name)
        to.inc(10 * i)
        back.inc(i)
        moved.labels(name, "to_backend").inc(10 * i)
        moved.labels(name, "from_backend").inc(i)
        into, out = ours.client_bytes_of()
        into.inc(i)
        out.inc(2 * i)
        client.labels("from_client").inc(i)
        client.labels("to_client").inc(2 * i)
        ours.connect_time_of(name).observe(seconds)
        connect.labels(name).observe(seconds)
        ours.session_duration.observe(seconds)
        duration.observe(seconds)
    names = (
        "replicaproxy_sessions",
        "replicaproxy_bytes",
        "replicaproxy_client_bytes",
        "replicaproxy_connect_seconds",
        "replicaproxy_session_duration_seconds",
    )
    assert text(ours.registry, names) == text(theirs, names)
    ours.forget_backend("p")
    moved.remove("p", "to_backend")
    moved.remove("p", "from_backend")
    connect.remove("p")
    assert text(ours.registry, names) == text(theirs, names)
