"""Tier 2: failover between sessions, the persisted view, the admin API and ctl."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from replicaproxy.demo.protocol import EXPECTED_LINES
from support import (
    WAIT,
    Proc,
    config_text,
    connect,
    example_client,
    example_server,
    free_port,
    recv_all,
    redis,
    redis_cli,
    refused,
    replicaproxy,
    run_proxy,
    sink,
)


def test_example_primary_killed_between_sessions(tmp_path: Path) -> None:
    with example_server("mv1") as (mv1, p1), example_server("mv2") as (mv2, p2):
        config = config_text(tmp_path, [("mv1", p1, "primary"), ("mv2", p2, "replica")])
        with run_proxy(config) as px:
            assert example_client(px.port) == "HOLA"
            assert mv2.wait_stdout_lines(8) == list(EXPECTED_LINES)
            mv1.signal(signal.SIGKILL)
            mv1.wait()
            # The very next session succeeds, at its first try, on the replica.
            assert example_client(px.port) == "HOLA"
            assert mv2.wait_stdout_lines(16)[8:] == list(EXPECTED_LINES)
            status = px.status()
            assert status["primary"] == "mv2" and status["epoch"] == 1
            assert status["last_stop"] == "none", "a new view: no run before this one"
            assert px.states() == {"mv1": "stale", "mv2": "in_sync"}
            assert json.loads((tmp_path / "state.json").read_text())["primary"] == "mv2"


def test_redis_primary_killed_between_sessions_and_the_view_survives_restart(
    tmp_path: Path,
) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    with redis(tmp_path / "p", "r1") as (r1, p1), redis(tmp_path / "r", "r2") as (_, p2):
        config = config_text(tmp_path, [("r1", p1, "primary"), ("r2", p2, "replica")])
        with run_proxy(config) as px:
            assert redis_cli(px.port, "SET", "greeting", "hola") == "OK"
            assert redis_cli(px.port, "RPUSH", "list", "a", "b", "c") == "3"
            r1.signal(signal.SIGKILL)
            r1.wait()
            assert redis_cli(px.port, "GET", "greeting") == "hola"
            assert redis_cli(px.port, "LRANGE", "list", "0", "-1").split() == ["a", "b", "c"]
            assert px.status()["primary"] == "r2"
            px.proc.signal(signal.SIGTERM)
            assert px.proc.wait() == 0
        # A restart keeps the view, whatever the config says.
        with run_proxy(config, name="proxy-again") as px:
            px.proc.wait_for(r"names r2 as primary, not the config's r1: using the state file")
            status = px.status()
            assert status["primary"] == "r2" and status["epoch"] == 1
            assert px.states() == {"r1": "stale", "r2": "in_sync"}
            assert redis_cli(px.port, "GET", "greeting") == "hola"


def test_old_primary_back_empty_is_never_primary_again(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with redis(tmp_path / "a", "r1") as (r1, p1), redis(tmp_path / "b", "r2") as (r2, p2):
        config = config_text(tmp_path, [("r1", p1, "primary"), ("r2", p2, "replica")])
        with run_proxy(config) as px:
            assert redis_cli(px.port, "SET", "k", "v") == "OK"
            r1.signal(signal.SIGKILL)
            r1.wait()
            px.proc.wait_for(r"failover: primary r1 down")  # by health checks, no traffic
            # r1 restarts on its port, empty.
            r1b = Proc(r1.args, name="r1-again")
            try:
                r1b.wait_for("Ready to accept connections")
                px.proc.wait_for(r"health: r1 is up \(stays stale until marked synced\)")
                r2.signal(signal.SIGKILL)
                r2.wait()
                px.proc.wait_for(r"primary r2 is down and no in-sync replica is up")
                # No session may land on the empty r1.
                with pytest.raises(subprocess.CalledProcessError):
                    redis_cli(px.port, "GET", "k")
                status = px.status()
                assert status["primary"] == "r2"
                assert px.states()["r1"] == "stale"
                assert redis_cli(p1, "DBSIZE") == "0"
            finally:
                r1b.stop()


def test_health_check_fails_over_without_traffic_within_its_bound(tmp_path: Path) -> None:
    with sink("a") as (a, pa), sink("b") as (_, pb):
        config = config_text(
            tmp_path,
            [("a", pa, "primary"), ("b", pb, "replica")],
            health="interval = 0.2\ntimeout = 0.3\nfall = 3\nrise = 1",
        )
        with run_proxy(config) as px:
            px.proc.wait_for(r"health: b is up")
            a.signal(signal.SIGKILL)
            # fall x interval + timeout = 0.9 s; allow generous slack for a busy machine.
            px.proc.wait_for(r"failover: primary a down", timeout=5)
            assert px.status()["primary"] == "b"


def test_min_in_sync_refuses_then_admits_after_mark_synced(tmp_path: Path) -> None:
    with sink("a") as (_, pa), sink("b") as (b, pb):
        config = config_text(
            tmp_path, [("a", pa, "primary"), ("b", pb, "replica")], extra="min_in_sync = 1"
        )
        with run_proxy(config) as px:
            with connect(px.port) as s:
                s.sendall(b"ok")
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s).startswith(b"2 ")
            b.signal(signal.SIGKILL)
            b.wait()
            px.proc.wait_for(r"replica b is now stale")
            assert refused(px.port)
            px.proc.wait_for(r"refused .*0 in-sync replicas reachable, min_in_sync is 1")
            # Marked synced while still down: still not reachable, still refused.
            assert px.ctl("mark-synced", "b").returncode == 0
            assert px.states()["b"] == "in_sync"
            assert refused(px.port)
            # The operator brings b back (with the data copied): sessions are admitted.
            seen = len(px.proc.lines)
            with sink("b-again", port=pb):
                px.proc.wait_for(r"health: b is up", start=seen)
                with connect(px.port) as s:
                    s.sendall(b"back")
                    s.shutdown(socket.SHUT_WR)
                    assert recv_all(s).startswith(b"4 ")


def test_promote_and_mark_synced_through_ctl(tmp_path: Path) -> None:
    with sink("a") as (_, pa), sink("b") as (_, pb), sink("s") as (_, ps):
        config = config_text(
            tmp_path, [("a", pa, "primary"), ("b", pb, "replica"), ("s", ps, "shadow")]
        )
        with run_proxy(config) as px:
            table = px.ctl("status")
            assert table.returncode == 0
            for word in ("epoch 0", "primary a", "in_sync", "shadow"):
                assert word in table.stdout, table.stdout
            out = px.ctl("promote", "b")
            assert out.returncode == 0, out.stderr
            status = px.status()
            assert status["primary"] == "b" and status["epoch"] == 1
            assert px.states()["a"] == "in_sync", "a planned switchover keeps the old primary"
            # New sessions go to b.
            with connect(px.port) as s:
                s.sendall(b"to b")
                s.shutdown(socket.SHUT_WR)
                recv_all(s)
            px.proc.wait_for(r"backends=b,a,s outcome=ok")
            # Refusals are errors with a message, and change nothing.
            for args, message in [
                (("promote", "s"), "shadow"),
                (("promote", "nope"), "no backend named"),
                (("mark-synced", "a"), "in_sync"),
                (("promote", "b"), "already the primary"),
            ]:
                out = px.ctl(*args)
                assert out.returncode == 1
                assert message in out.stderr
            assert px.status()["epoch"] == 1


def test_replica_lost_during_a_session_is_stale_afterwards(tmp_path: Path) -> None:
    with sink("a") as (primary, pa), sink("b") as (b, pb):
        config = config_text(
            tmp_path,
            [("a", pa, "primary"), ("b", pb, "replica")],
            health="interval = 30\ntimeout = 1",  # the session, not the checker, notices
        )
        with run_proxy(config) as px:
            s = connect(px.port)
            try:
                s.sendall(b"first half ")
                # The session's connection to b is up (the first was the health check).
                b.wait_count(r"^open$", 2)
                b.signal(signal.SIGKILL)
                b.wait()
                s.sendall(b"second half")
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s).startswith(b"22 ")
                px.proc.wait_for(r"replica b is now stale: (connection lost|closed its output)")
            finally:
                s.close()
            primary.wait_for(r"conn 22 ")
            assert px.states()["b"] == "stale"


def test_mutations_need_the_token_when_one_is_set(tmp_path: Path) -> None:
    with sink("a") as (_, pa), sink("b") as (_, pb):
        config = config_text(tmp_path, [("a", pa, "primary"), ("b", pb, "replica")])
        text = Path(config).read_text().replace("[admin]\n", '[admin]\ntoken = "s3cret"\n')
        Path(config).write_text(text)
        with run_proxy(config) as px:
            request = urllib.request.Request(f"http://{px.admin}/backends/b/promote", method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=WAIT)
            assert err.value.code == 401
            assert px.ctl("promote", "b", token="wrong").returncode == 1
            assert px.status()["primary"] == "a"
            assert px.ctl("promote", "b", token="s3cret").returncode == 0
            assert px.status()["primary"] == "b"


def test_admin_off_loopback_without_token_is_a_config_error(tmp_path: Path) -> None:
    config = config_text(tmp_path, [("a", free_port(), "primary")])
    text = (
        Path(config)
        .read_text()
        .replace('[admin]\nlisten = "127.0.0.1:0"', '[admin]\nlisten = "0.0.0.0:9901"')
    )
    Path(config).write_text(text)
    out = subprocess.run(replicaproxy("check", config), capture_output=True, text=True,
                         timeout=WAIT)  # fmt: skip
    assert out.returncode == 2
    assert "admin.token" in out.stderr


def test_unusable_state_file_is_a_one_line_error(tmp_path: Path) -> None:
    config = config_text(tmp_path, [("a", free_port(), "primary")])
    (tmp_path / "state.json").write_text("garbage")
    out = subprocess.run(replicaproxy("run", "--config", config), capture_output=True,
                         text=True, timeout=WAIT)  # fmt: skip
    assert out.returncode == 2
    assert "not a replicaproxy state file" in out.stderr
    assert "Traceback" not in out.stderr
