"""Tier 2: what an operator uses: metrics, reload, drain, JSON logs."""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support import (
    WAIT,
    config_text,
    connect,
    echo_round_trip,
    example_client,
    example_server,
    recv_all,
    refused,
    replicaproxy,
    run_proxy,
    running,
    sink,
)

FAMILIES = [
    "replicaproxy_sessions_total",
    "replicaproxy_sessions_active",
    "replicaproxy_bytes_total",
    "replicaproxy_backend_up",
    "replicaproxy_backend_in_sync",
    "replicaproxy_failovers_total",
    "replicaproxy_divergences_total",
    "replicaproxy_epoch",
    "replicaproxy_replica_lag_bytes",
    "replicaproxy_held_bytes",
    "replicaproxy_refused_total",
    "replicaproxy_connect_seconds_bucket",
    "replicaproxy_session_duration_seconds_bucket",
]


def post(admin: str, path: str) -> dict[str, object]:
    request = urllib.request.Request(f"http://{admin}{path}", method="POST")
    with urllib.request.urlopen(request, timeout=WAIT) as r:
        answer: dict[str, object] = json.loads(r.read())
        return answer


def test_metrics_has_every_family_with_real_numbers(tmp_path: Path) -> None:
    with example_server("p") as (_, pp), example_server("r") as (_, rp):
        config = config_text(tmp_path, [("p", pp, "primary"), ("r", rp, "replica")])
        with run_proxy(config) as px:
            assert example_client(px.port) == "HOLA"
            px.proc.wait_for(r"outcome=ok")
            with urllib.request.urlopen(f"http://{px.admin}/metrics", timeout=WAIT) as r:
                text = r.read().decode()
            for family in FAMILIES:
                assert family in text, family
            assert "replicaproxy_sessions_total 1.0" in text
            assert 'replicaproxy_bytes_total{backend="r",direction="to_backend"} 56.0' in text
            assert 'replicaproxy_client_bytes_total{direction="to_client"} 4.0' in text
            assert 'replicaproxy_connect_seconds_count{backend="p"} 1.0' in text


@pytest.mark.parametrize("replicas", [0, 1])
def test_byte_counts_are_exact_for_bytes_that_go_the_fast_way(
    tmp_path: Path, replicas: int
) -> None:
    """The hot path only counts what it moves; the counts reach the session exactly.

    Live (the totals of /status, while the session is open) and at the end (the
    access log), with no replica (the primary's output passes by count)
    and with one (compared, its input batched on the flush tick).
    """
    rng = random.Random(6)
    sizes = [rng.randint(1, 3000) for _ in range(300)]
    total = sum(sizes)
    with sink("p", echo=True) as (pproc, pp), sink("r", echo=True) as (rproc, rp):
        backends = [("p", pp, "primary")] + [("r", rp, "replica")] * replicas
        config = config_text(tmp_path, backends)
        with run_proxy(config) as px, connect(px.port) as s:
            for n in sizes:
                echo_round_trip(s, rng.randbytes(n))
            live = px.status()["client_bytes"]
            assert live == {"from_client": total, "to_client": total}
            s.shutdown(socket.SHUT_WR)
            summary = recv_all(s)  # the sink's "<bytes> <sha256>" line
            assert summary.startswith(f"{total} ".encode())
            line = px.proc.wait_for(r"outcome=ok").string
            counts = re.search(r"from_client=(\d+) to_client=(\d+)", line)
            assert counts is not None, line
            assert (int(counts[1]), int(counts[2])) == (total, total + len(summary))
            for proc in [pproc, rproc][: 1 + replicas]:  # (health checks' are "conn 0")
                proc.wait_for(rf"conn {total} [0-9a-f]{{64}} eof")


def test_a_big_batch_goes_to_the_replica_before_the_tick(tmp_path: Path) -> None:
    """Batched replica input past FLUSH_BYTES is written at once, whatever replica_flush.

    With a 30 s tick, a replica sees a 1 MiB stream within seconds (it echoes, so
    its bytes come back to the proxy and show in /status): a session never holds
    more than about 64 KiB of a fast client's stream for a replica.
    """
    size = 1 << 20
    with sink("p", echo=True) as (_, pp), sink("r", echo=True) as (_, rp):
        config = config_text(
            tmp_path, [("p", pp, "primary"), ("r", rp, "replica")], extra='replica_flush = "30s"'
        )
        with run_proxy(config) as px, connect(px.port) as s:
            echo_round_trip(s, random.Random(1).randbytes(size))
            deadline = time.monotonic() + 10.0
            seen = 0
            for _ in range(1000):  # each /status brings the byte counts up to date
                backends = px.status()["backends"]
                seen = next(b["bytes_from"] for b in backends if b["name"] == "r")
                if seen >= size - (64 << 10) or time.monotonic() > deadline:
                    break
            assert seen >= size - (64 << 10), f"the replica echoed {seen} of {size} bytes"


def test_sighup_adds_a_replica_without_dropping_a_live_session(tmp_path: Path) -> None:
    with sink("p") as (_, pp), sink("r1") as (_, r1), sink("r2") as (r2proc, r2):
        config = config_text(tmp_path, [("p", pp, "primary"), ("r1", r1, "replica")])
        with run_proxy(config) as px, connect(px.port) as live:
            live.sendall(b"before ")
            text = Path(config).read_text()
            text += f'[[backend]]\nname = "r2"\naddress = "127.0.0.1:{r2}"\nrole = "replica"\n'
            text = text.replace("[proxy]\n", '[proxy]\nidle_timeout = "10m"\n')
            Path(config).write_text(text)
            px.proc.signal(signal.SIGHUP)
            px.proc.wait_for(r"reloaded the config: added replica r2 .*proxy.idle_timeout: ")
            assert px.states() == {"p": "in_sync", "r1": "in_sync", "r2": "stale"}
            # The session from before the reload goes on, untouched.
            live.sendall(b"after")
            live.shutdown(socket.SHUT_WR)
            assert recv_all(live).startswith(b"12 ")
            # r2 is stale, so it gets no sessions until an operator marks it synced.
            assert px.ctl("mark-synced", "r2").returncode == 0
            with connect(px.port) as s:
                s.sendall(b"now r2 too")
                s.shutdown(socket.SHUT_WR)
                recv_all(s)
            r2proc.wait_for(r"conn 10 ")


def test_a_rejected_reload_is_logged_on_one_line_whatever_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "conf\ndir"  # a newline in the config's path
    folder.mkdir()
    with sink("p") as (_, pp):
        config = folder / "c.toml"
        config.write_text(Path(config_text(tmp_path, [("p", pp, "primary")])).read_text())
        with run_proxy(str(config)) as px:
            config.write_text(config.read_text().replace("[health]", "[health]\nfal = 3"))
            px.proc.signal(signal.SIGHUP)
            # The path is shown escaped, so the whole message is on this one line.
            px.proc.wait_for(r"reload rejected, .*conf\\ndir/c\.toml: health\.fal: unknown key")


def test_a_bad_reload_is_rejected_and_the_old_config_kept(tmp_path: Path) -> None:
    with sink("p") as (_, pp), sink("r") as (_, rp):
        config = config_text(tmp_path, [("p", pp, "primary"), ("r", rp, "replica")])
        good = Path(config).read_text()
        with run_proxy(config) as px:
            Path(config).write_text(good.replace("[health]", "[health]\nfal = 3"))
            with pytest.raises(urllib.error.HTTPError) as err:
                post(px.admin, "/reload")
            assert err.value.code == 400
            assert "health.fal: unknown key" in err.value.read().decode()
            px.proc.wait_for(r"reload rejected, the running config is kept")
            # Removing the current primary is refused too.
            swapped = good.replace('role = "primary"', 'role = "shadow"')
            Path(config).write_text(swapped.replace('role = "replica"', 'role = "primary"'))
            px.proc.signal(signal.SIGHUP)
            px.proc.wait_for(r"the current primary 'p' must stay")
            status = px.status()
            assert status["primary"] == "p" and status["epoch"] == 0
            with connect(px.port) as s:
                s.sendall(b"still serving")
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s).startswith(b"13 ")


def test_drain_finishes_open_sessions_then_exits(tmp_path: Path) -> None:
    with sink("p", echo=True) as (_, pp):
        config = config_text(tmp_path, [("p", pp, "primary")])
        with run_proxy(config) as px, connect(px.port) as live:
            echo_round_trip(live, b"in flight")  # the session is surely open now
            answer = post(px.admin, "/drain")
            assert answer == {"draining": True, "sessions": 1}
            px.proc.wait_for(r"waiting for as long as they last for 1 sessions")
            assert refused(px.port)
            live.shutdown(socket.SHUT_WR)
            assert recv_all(live).startswith(b"9 ")
            assert px.proc.wait() == 0
            state = json.loads((tmp_path / "state.json").read_text())
            assert state["clean"] is True


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    with sink("p") as (_, pp):
        config = config_text(tmp_path, [("p", pp, "primary")])
        args = replicaproxy("run", "--config", config, "--log-format", "json")
        with running(args, name="proxy-json") as proc:
            line = proc.wait_for(r'"message": "listening on').string
            port = int(json.loads(line)["message"].split(":")[1].split()[0])
            with connect(port) as s:
                s.sendall(b"hello")
                s.shutdown(socket.SHUT_WR)
                recv_all(s)
            access = json.loads(proc.wait_for(r'"outcome": "ok"').string)
            assert access["logger"] == "replicaproxy.access"
            assert access["from_client"] == 5 and access["backends"] == ["p"]
            proc.signal(signal.SIGTERM)
            assert proc.wait() == 0
            for line in proc.lines:
                record = json.loads(line)
                assert {"time", "level", "logger", "message"} <= set(record)


def test_allow_list_closes_other_clients_at_accept(tmp_path: Path) -> None:
    with sink("p") as (primary, pp):
        config = config_text(
            tmp_path, [("p", pp, "primary")], extra='allow = ["10.0.0.0/8", "::1/128"]'
        )
        with run_proxy(config) as px:
            assert refused(px.port)
            px.proc.wait_for(r"refused \('127\.0\.0\.1', \d+\): not in proxy\.allow")
            with urllib.request.urlopen(f"http://{px.admin}/metrics", timeout=WAIT) as r:
                assert 'replicaproxy_refused_total{reason="acl"} 1.0' in r.read().decode()
            assert primary.count(r"^conn \d+ ") == primary.count(r"^conn 0 "), (
                "nothing from a refused client reaches a backend"
            )
        allowed = config_text(tmp_path, [("p", pp, "primary")], extra='allow = ["127.0.0.1/32"]')
        with run_proxy(allowed) as px, connect(px.port) as s:
            s.sendall(b"hi")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s).startswith(b"2 ")
