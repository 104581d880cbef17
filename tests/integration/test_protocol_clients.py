"""Tier 2: protocol = "postgres", "http" and "memcached" with real servers and clients.

Two honest servers answer the same requests with bytes of their own (PostgreSQL's
BackendKeyData, HTTP's Date and ETag, memcached's CAS uniques and stats): these
tests check that those differences neither stop replication nor a takeover across
a kill -9 of the primary, and that real differences (a login one server refuses)
still make a replica stale.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import (
    HOST,
    WAIT,
    Proc,
    Proxy,
    config_text,
    make_certs,
    memcached,
    metric,
    nginx,
    postgres,
    psql,
    require_binary,
    run_proxy,
    wait_until,
)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def framed_proxy(
    tmp_path: Path, protocol: str, pport: int, rport: int, *, mode: str = "async",
    extra: str = "",
) -> Iterator[Proxy]:  # fmt: skip
    config = config_text(
        tmp_path,
        [("primary", pport, "primary"), ("replica", rport, "replica")],
        extra=f'mode = "{mode}"\nprotocol = "{protocol}"\n{extra}',
    )
    with run_proxy(config) as px:
        yield px


def backend(px: Proxy, name: str) -> dict[str, Any]:
    [b] = [b for b in px.status()["backends"] if b["name"] == name]
    return dict(b)


def crash(proc: Proc) -> None:
    """kill -9 of the server and every process of it (postmaster and backends, nginx's
    master and workers), as a machine or a container going away does."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ------------------------------------------------------------------ PostgreSQL


def balances(port: int) -> list[str]:
    """pgbench's sums (accounts, tellers, branches, history's deltas) and history rows."""
    return psql(
        port,
        "select (select sum(abalance) from pgbench_accounts), "
        "(select sum(tbalance) from pgbench_tellers), "
        "(select sum(bbalance) from pgbench_branches), "
        "(select coalesce(sum(delta), 0) from pgbench_history), "
        "(select count(*) from pgbench_history)",
    ).split("|")


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_pgbench_loses_no_transaction_when_the_primary_is_killed(tmp_path: Path, mode: str) -> None:
    pgbench = require_binary("pgbench")
    with (
        postgres("primary") as (primary, pport),
        postgres("replica") as (_replica, rport),
        # (pgbench -i's COPY and CREATE INDEX on two servers sharing two cores may leave
        # the replica a few seconds behind: more than the default replica_timeout)
        framed_proxy(
            tmp_path, "postgres", pport, rport, mode=mode, extra='replica_timeout = "20s"'
        ) as px,
    ):
        common = ["-h", HOST, "-p", str(px.port), "-U", "postgres"]
        init = subprocess.run(
            [pgbench, "-i", "-s", "1", "-q", *common, "postgres"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        assert px.states() == {"primary": "in_sync", "replica": "in_sync"}, px.proc.lines[-5:][-20:]
        assert backend(px, "replica")["divergences"] == 0
        assert backend(px, "replica")["allowed_differences"] > 0, "BackendKeyData differs"
        # Two clients in async mode; one in sync mode, where two transactions that
        # lock the same rows in another order on each server wait for each other until
        # replica_timeout (README "Known limits": the order of concurrent sessions).
        clients = "2" if mode == "async" else "1"
        steady = subprocess.run(
            [pgbench, "-c", clients, "-j", "1", "-T", "3", "-n", *common, "postgres"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert steady.returncode == 0, steady.stdout + steady.stderr
        states = px.states()
        assert states == {"primary": "in_sync", "replica": "in_sync"}, px.proc.lines[-8:]
        held = balances(rport)
        assert balances(pport) == held, "both clusters hold the same balances"
        run = subprocess.Popen(
            [pgbench, "-c", clients, "-j", "1", "-T", "8", "-n", *common, "postgres"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:

            def committed() -> bool:
                # 200 more than the steady run left: the kill lands inside this run, with
                # a session open to take over (not at its first connect, a failover at
                # connect: the steady run alone commits hundreds in 3 s).
                assert run.poll() is None, run.communicate()[0]
                rows = int(psql(rport, "select count(*) from pgbench_history"))
                return rows >= int(held[4]) + 200

            wait_until("pgbench has committed 200 transactions on the replica", committed)
            crash(primary)
            out, _ = run.communicate(timeout=60)
        finally:
            run.kill()
        assert run.returncode == 0, out + "\n".join(px.proc.lines[-30:])
        assert "aborted" not in out, out
        assert re.search(r"number of failed transactions: 0\b", out), out
        processed = int(re.search(r"actually processed: (\d+)", out)[1])  # type: ignore[index]
        px.proc.wait_for(r"took over from primary")
        assert px.status()["primary"] == "replica"
        assert backend(px, "replica")["divergences"] == 0
        sums = balances(rport)
        assert len(set(sums[:4])) == 1, f"balances disagree: {sums}"
        history = int(sums[4]) - int(held[4])
        assert history == processed, f"{processed} transactions, {history} in the history"


def test_a_replica_that_refuses_a_login_the_primary_accepts_is_stale(tmp_path: Path) -> None:
    with (
        postgres("primary") as (_p, pport),
        postgres("replica") as (_r, rport),
        framed_proxy(tmp_path, "postgres", pport, rport) as px,
    ):
        psql(pport, "create role app login")  # on the primary only
        assert psql(px.port, "select current_user", user="app") == "app"
        px.proc.wait_for(r"replica is now stale: .*FATAL")
        assert px.states()["replica"] == "stale"
        assert backend(px, "replica")["divergences"] == 1


def test_a_cancel_reaches_every_backend_with_its_own_key(tmp_path: Path) -> None:
    binary = require_binary("psql")
    with (
        postgres("primary") as (_p, pport),
        postgres("replica") as (_r, rport),
        framed_proxy(tmp_path, "postgres", pport, rport) as px,
    ):
        sleeping = "select count(*) from pg_stat_activity where query like 'select pg_sleep%'"
        client = subprocess.Popen(
            [binary, "-h", HOST, "-p", str(px.port), "-U", "postgres", "-X",
             "-c", "select pg_sleep(60)"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            for port in (pport, rport):
                wait_until("the query runs", lambda p=port: psql(p, sleeping) == "1")
            client.send_signal(signal.SIGINT)  # psql sends a CancelRequest
            out, _ = client.communicate(timeout=WAIT)
        finally:
            client.kill()
        assert "canceling statement due to user request" in out
        for port in (pport, rport):
            wait_until("the query ended", lambda p=port: psql(p, sleeping) == "0")
        px.proc.wait_for(r"cancel request from .*, sent to primary, replica")
        assert px.states() == {"primary": "in_sync", "replica": "in_sync"}
        assert backend(px, "replica")["divergences"] == 0


def test_postgres_tls_both_ways_the_proxy_ends_the_clients_and_asks_the_backends(
    tmp_path: Path,
) -> None:
    """sslmode=require and verify-full clients talk TLS to the proxy, which answers their
    SSLRequest with its own certificate; the backends take TLS connections only, and the
    proxy asks each with an SSLRequest of its own. Both hold the same rows."""
    binary = require_binary("psql")
    certs = make_certs(tmp_path / "certs")

    def client(port: int, sslmode: str, sql: str, ca: Path = certs.ca) -> tuple[int, str, str]:
        out = subprocess.run(
            [binary, "-h", HOST, "-p", str(port), "-U", "postgres", "-XAtq", "-c", sql],
            capture_output=True, text=True, timeout=WAIT,
            env={**os.environ, "PGSSLMODE": sslmode, "PGSSLROOTCERT": str(ca),
                 "PGCONNECT_TIMEOUT": "5"},
        )  # fmt: skip
        return out.returncode, out.stdout.strip(), out.stderr

    hostssl = "hostssl all all 127.0.0.1/32 trust"  # no plaintext logins
    to_backend = f'tls = true\ntls_ca = "{certs.ca}"'
    with (
        postgres("primary", hba=hostssl, tls=certs.server) as (_p, pport),
        postgres("replica", hba=hostssl, tls=certs.server) as (_r, rport),
    ):
        config = config_text(
            tmp_path,
            [("primary", pport, "primary", to_backend), ("replica", rport, "replica", to_backend)],
            extra=f'protocol = "postgres"\ntls_cert = "{certs.server.cert}"\n'
            f'tls_key = "{certs.server.key}"',
        )
        with run_proxy(config) as px:
            rc, _, err = client(px.port, "verify-full", "create table t (n int)")
            assert rc == 0, err
            for n in range(20):
                rc, _, err = client(px.port, "require", f"insert into t values ({n})")
                assert rc == 0, err
            rc, info, err = client(px.port, "verify-full", "\\conninfo")
            assert "SSL connection (protocol: TLSv1.3" in info, info + err
            assert px.states() == {"primary": "in_sync", "replica": "in_sync"}, px.proc.lines[-5:]
            for port in (pport, rport):
                assert client(port, "require", "select count(*), sum(n) from t")[1] == "20|190"
            # A client that will not speak TLS is refused, in PostgreSQL's own words.
            rc, _, err = client(px.port, "disable", "select 1")
            assert rc != 0 and "this proxy takes TLS connections only" in err, err
            # A client that does not trust the proxy's certificate: a failed handshake.
            rc, _, err = client(px.port, "verify-full", "select 1", ca=certs.other_ca)
            assert rc != 0 and "certificate verify failed" in err, err
            failures = 'replicaproxy_tls_handshake_failures_total{reason="cert_refused"}'
            wait_until("the refused handshake is counted", lambda: metric(px.admin, failures) == 1)
            assert px.states() == {"primary": "in_sync", "replica": "in_sync"}
            assert backend(px, "replica")["divergences"] == 0


# ------------------------------------------------------------------ HTTP


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_http_keep_alive_puts_and_gets_survive_kill_9_of_the_primary(
    tmp_path: Path, mode: str
) -> None:
    with (
        nginx("primary") as (primary, pport, _pdir),
        nginx("replica", clock="-1h") as (_r, rport, rdir),  # its Date: always another
        framed_proxy(
            # (nginx's ETag and Last-Modified hold its file's mtime, and the Location
            # of a 201 its own port: each server's own)
            tmp_path, "http", pport, rport, mode=mode,
            extra='[protocol.http]\nignore_headers = ["date", "etag", "last-modified", "location"]',
        ) as px,
    ):  # fmt: skip
        conn = http.client.HTTPConnection(HOST, px.port, timeout=WAIT)
        for i in range(300):
            if i == 150:
                assert px.states() == {"primary": "in_sync", "replica": "in_sync"}
                assert backend(px, "replica")["allowed_differences"] >= 300, "Date differs"
                sock = conn.sock
                crash(primary)
            body = f"value {i}\n".encode() * (1 + i % 7)
            conn.request("PUT", f"/k/{i}", body=body)  # (a state change, as a POST)
            put = conn.getresponse()
            put.read()
            assert put.status in (201, 204), put.status
            conn.request("GET", f"/k/{i}")
            got = conn.getresponse()
            assert (got.status, got.read()) == (200, body)
        assert conn.sock is sock, "the same connection, never reconnected"
        conn.close()
        px.proc.wait_for(r"took over from primary")
        assert backend(px, "replica")["divergences"] == 0
        assert len(list((rdir / "k").iterdir())) == 300


def test_http_a_response_that_really_differs_makes_the_replica_stale(tmp_path: Path) -> None:
    with (
        nginx("primary") as (_p, pport, pdir),
        nginx("replica") as (_r, rport, rdir),
        framed_proxy(tmp_path, "http", pport, rport) as px,
    ):
        (pdir / "page").write_text("one")
        (rdir / "page").write_text("two")
        conn = http.client.HTTPConnection(HOST, px.port, timeout=WAIT)
        conn.request("GET", "/page")
        assert conn.getresponse().read() == b"one"
        conn.close()
        px.proc.wait_for(r"GET /page differs")
        wait_until("the replica is stale", lambda: px.states()["replica"] == "stale")


# ------------------------------------------------------------------ memcached


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_pymemcache_survives_kill_9_of_the_primary(tmp_path: Path, mode: str) -> None:
    pymemcache = pytest.importorskip("pymemcache.client.base")
    with (
        memcached("primary") as (primary, pport),
        memcached("replica") as (_r, rport),
        framed_proxy(tmp_path, "memcached", pport, rport, mode=mode) as px,
    ):
        # (pymemcache's default noreply writes meet Nagle's algorithm and delayed ACKs,
        # 40 ms a time, direct or not: replies make the loop quick)
        mc = pymemcache.Client(
            (HOST, px.port), timeout=WAIT, connect_timeout=WAIT, default_noreply=False
        )
        mc.set("counter", b"0")
        for i in range(400):
            if i == 200:
                assert px.states() == {"primary": "in_sync", "replica": "in_sync"}
                assert backend(px, "replica")["allowed_differences"] > 0, "stats, CAS differ"
                sock = mc.sock
                crash(primary)
            mc.set(f"k{i}", f"v{i}".encode())
            value, cas = mc.gets(f"k{i}")  # (each server's own unique: not compared)
            assert value == f"v{i}".encode() and cas
            mc.append(f"k{i}", b"+")
            assert mc.incr("counter", 1) == i + 1
            if i % 50 == 0:
                assert mc.stats()[b"pid"] > 0
                assert mc.version()
        assert mc.sock is sock, "the same connection, never reconnected"
        mc.close()
        px.proc.wait_for(r"took over from primary")
        assert backend(px, "replica")["divergences"] == 0
        direct = pymemcache.Client((HOST, rport), timeout=WAIT)
        assert direct.get_many([f"k{i}" for i in range(400)]) == {
            f"k{i}": f"v{i}+".encode() for i in range(400)
        }
        assert direct.get("counter") == b"400"
        direct.close()


def test_a_cas_with_the_primarys_unique_makes_the_replica_stale(tmp_path: Path) -> None:
    """A known limit (README "Protocols"): the replica cannot honour the primary's CAS
    unique, so it refuses the write the primary made: a real divergence."""
    pymemcache = pytest.importorskip("pymemcache.client.base")
    with (
        memcached("primary") as (_p, pport),
        memcached("replica") as (_r, rport),
        framed_proxy(tmp_path, "memcached", pport, rport) as px,
    ):
        other = pymemcache.Client((HOST, rport), timeout=WAIT)
        other.set("elsewhere", b"x")  # (the two servers' uniques now count apart)
        other.close()
        mc = pymemcache.Client((HOST, px.port), timeout=WAIT)
        mc.set("a", b"1")
        _, cas = mc.gets("a")
        assert mc.cas("a", b"2", cas)
        mc.close()
        px.proc.wait_for(r"reply \d+ to CAS differs")
        wait_until("the replica is stale", lambda: px.states()["replica"] == "stale")
