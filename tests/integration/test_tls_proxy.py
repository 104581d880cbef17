"""Tier 2: TLS for clients, to backends and on the admin API, with real Redis and openssl.

Certificates are made per test (tests/support.py ``make_certs``). Redis listens on a TLS
port, and on a plain one that only ``DEBUG DIGEST`` uses: the proxy is pointed at the
TLS ports, which answer nothing else, so what reaches a backend went over TLS.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support import (
    HOST,
    WAIT,
    Certs,
    Pair,
    assert_no_crash,
    config_text,
    digest,
    make_certs,
    make_pair,
    metric,
    redis,
    redis_cli,
    redis_tls,
    replicaproxy,
    require_binary,
    run_proxy,
    wait_until,
)

pytestmark = pytest.mark.slow

FAILURES = "replicaproxy_tls_handshake_failures_total"


def tls_client(
    port: int,
    ca: Path,
    pair: Pair | None = None,
    *,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLSocket:
    """A TLS connection to the proxy that trusts ``ca`` and presents ``pair`` if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if pair is not None:
        context.load_cert_chain(str(pair.cert), str(pair.key))
    if max_version is not None:
        context.maximum_version = max_version
    raw = socket.create_connection((HOST, port), timeout=WAIT)
    try:
        return context.wrap_socket(raw, server_hostname=HOST)
    except BaseException:
        raw.close()
        raise


def ping(s: socket.socket) -> bytes:
    """Send a RESP PING on ``s`` and return the reply line (b"" if the proxy closed)."""
    s.sendall(b"*1\r\n$4\r\nPING\r\n")
    got = b""
    while not got.endswith(b"\r\n"):
        chunk = s.recv(64)
        if not chunk:
            break
        got += chunk
    return got


def refused(
    port: int, ca: Path, pair: Pair | None = None, *, max_version: ssl.TLSVersion | None = None
) -> bool:
    """Whether a TLS client is turned away: its handshake fails, or (TLS 1.3, where the
    server checks the client's certificate after the client is done) its first request
    finds the connection closed."""
    try:
        with tls_client(port, ca, pair, max_version=max_version) as s:
            return ping(s) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def redis_cli_tls(port: int, ca: Path, *cmd: str, pair: Pair | None = None) -> str:
    """redis-cli over TLS through the proxy; its output (it must exit 0)."""
    binary = require_binary("redis-cli")
    mtls = ["--cert", str(pair.cert), "--key", str(pair.key)] if pair is not None else []
    out = subprocess.run(
        [binary, "-h", HOST, "-p", str(port), "--tls", "--cacert", str(ca), *mtls, *cmd],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@contextlib.contextmanager
def two_tls_redis(tmp_path: Path, certs: Certs) -> Iterator[tuple[int, int, int, int]]:
    """A primary and a replica speaking TLS with ``certs.server``; the replica wants a
    client certificate. Yields (primary plain port, its TLS port, replica's, replica's)."""
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    s = certs.server
    with (
        redis_tls(tmp_path / "p", "primary", s.cert, s.key, certs.ca) as (_, pport, ptls),
        redis_tls(tmp_path / "r", "replica", s.cert, s.key, certs.ca, auth_clients=True) as (
            _,
            rport,
            rtls,
        ),
    ):
        yield pport, ptls, rport, rtls


def backend_tls(certs: Certs, pair: Pair | None = None, extra: str = "") -> str:
    lines = ["tls = true", f'tls_ca = "{certs.ca}"', extra]
    if pair is not None:
        lines += [f'tls_cert = "{pair.cert}"', f'tls_key = "{pair.key}"']
    return "\n".join(lines)


def client_tls(pair: Pair, extra: str = "") -> str:
    return f'tls_cert = "{pair.cert}"\ntls_key = "{pair.key}"\n{extra}'


# ------------------------------------------------------------------ TLS both ways


def test_tls_both_ways_with_redis_cli_and_redis_benchmark_leaves_identical_data(
    tmp_path: Path,
) -> None:
    """Clients speak TLS to the proxy, the proxy speaks TLS to both backends (mutual TLS
    to the replica): every client byte reaches both, decrypted and encrypted again."""
    benchmark = require_binary("redis-benchmark")
    certs = make_certs(tmp_path / "certs")
    with two_tls_redis(tmp_path, certs) as (pport, ptls, rport, rtls):
        config = config_text(
            tmp_path,
            [
                ("primary", ptls, "primary", backend_tls(certs)),
                ("replica", rtls, "replica", backend_tls(certs, certs.client)),
            ],
            extra=f'protocol = "resp"\n{client_tls(certs.server)}',
        )
        with run_proxy(config) as px:
            # COMMAND's tips were read from the primary, over TLS too.
            px.proc.wait_for(r"rules from primary's COMMAND tips")
            assert redis_cli_tls(px.port, certs.ca, "SET", "greeting", "hola") == "OK"
            assert redis_cli_tls(px.port, certs.ca, "GET", "greeting") == "hola"
            started = time.monotonic()
            out = subprocess.run(
                [benchmark, "-h", HOST, "-p", str(px.port), "--tls", "--cacert",
                 str(certs.ca), "-t", "set,get", "-n", "10000", "-c", "20", "-r", "5000",
                 "-q"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            took = time.monotonic() - started
            assert out.returncode == 0, out.stderr
            assert int(redis_cli(pport, "DBSIZE")) > 1000
            assert digest(pport) == digest(rport)
            status = px.status()
            assert status["tls"] is True
            assert {b["name"]: (b["state"], b["health"], b["tls"]) for b in status["backends"]} == {
                "primary": ("in_sync", "up", True),
                "replica": ("in_sync", "up", True),
            }
            assert_no_crash(px.proc)
            print(f"MEASURED redis-benchmark --tls through a TLS proxy (set,get 10000 each): "
                  f"{20000 / took:.0f} req/s overall; digests equal")  # fmt: skip


# -------------------------------------------------------- bad input on the TLS port


def test_plaintext_garbage_and_old_versions_on_the_tls_port_are_closed_and_counted(
    tmp_path: Path,
) -> None:
    """Nothing but a TLS client gets a session; the rest is closed, counted by reason,
    logged in one line, and the proxy serves on. The backend speaks plaintext."""
    certs = make_certs(tmp_path / "certs")
    with redis(tmp_path, "primary") as (_, pport):
        config = config_text(
            tmp_path,
            [("primary", pport, "primary")],
            extra=client_tls(certs.server, 'tls_min_version = "TLSv1.3"'),
        )
        with run_proxy(config) as px:
            sent = {
                "plaintext RESP": b"*1\r\n$4\r\nPING\r\n",
                "inline": b"PING\r\n",
                "HTTP": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                "garbage": bytes(range(256)) * 4,
            }
            closed_after = []
            for data in sent.values():
                with socket.create_connection((HOST, px.port), timeout=WAIT) as s:
                    began = time.monotonic()
                    s.sendall(data)
                    with contextlib.suppress(ConnectionResetError):  # (or reset)
                        assert s.recv(1024) == b""  # closed without a byte
                    closed_after.append(time.monotonic() - began)
            with socket.create_connection((HOST, px.port), timeout=WAIT):
                pass  # connected, closed, no hello at all
            assert refused(px.port, certs.ca, max_version=ssl.TLSVersion.TLSv1_2)
            wait_until(
                "the failures counted",
                lambda: (
                    metric(px.admin, f'{FAILURES}{{reason="not_tls"}}') == len(sent)
                    and metric(px.admin, f'{FAILURES}{{reason="version"}}') == 1
                    and metric(px.admin, f'{FAILURES}{{reason="closed"}}') == 1
                ),
            )
            px.proc.wait_for(r"TLS handshake with 127\.0\.0\.1:\d+ failed \(not_tls\): .*wrong")
            px.proc.wait_for(r"failed \(version\): .*tls_min_version")
            # Served on, and the backend got plaintext.
            with tls_client(px.port, certs.ca) as s:
                assert ping(s) == b"+PONG\r\n"
                assert s.version() == "TLSv1.3"
            assert metric(px.admin, "replicaproxy_sessions_total") == 1
            assert_no_crash(px.proc)
            print(f"MEASURED plaintext/garbage on the TLS port: {len(sent)} closed, slowest "
                  f"after {max(closed_after) * 1000:.1f} ms; counted by reason")  # fmt: skip


def test_a_flood_of_plaintext_on_the_tls_port_leaves_tls_clients_served(
    tmp_path: Path,
) -> None:
    """1000 connections that send plaintext or garbage, 20 at a time, while redis-benchmark
    runs over TLS: the benchmark sees no error, each bad connection is counted, and the
    log says so in a few rate-limited lines, not a thousand."""
    benchmark = require_binary("redis-benchmark")
    certs = make_certs(tmp_path / "certs")
    with redis(tmp_path, "primary") as (_, pport):
        config = config_text(
            tmp_path, [("primary", pport, "primary")], extra=client_tls(certs.server)
        )
        with run_proxy(config) as px:
            bench = subprocess.Popen(
                [benchmark, "-h", HOST, "-p", str(px.port), "--tls", "--cacert",
                 str(certs.ca), "-t", "set,get", "-n", "20000", "-c", "20", "-q"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:

                def bad(i: int) -> None:
                    with socket.create_connection((HOST, px.port), timeout=WAIT) as s:
                        # (Garbage of 5 bytes or more: fewer are not yet a TLS record
                        # header, and the proxy waits for the rest, up to its timeout.)
                        garbage = (b"\x00\x00" + bytes(range(256)))[: 5 + i % 64]
                        s.sendall(b"PING\r\n" if i % 2 else garbage)
                        with contextlib.suppress(ConnectionResetError):
                            while s.recv(4096):
                                pass

                began = time.monotonic()
                with ThreadPoolExecutor(20) as pool:
                    list(pool.map(bad, range(1000)))
                flood = time.monotonic() - began
                out, err = bench.communicate(timeout=120)
            finally:
                bench.kill()
                bench.wait()
            assert bench.returncode == 0, err
            wait_until(
                "1000 counted",
                lambda: metric(px.admin, f'{FAILURES}{{reason="not_tls"}}') == 1000,
            )
            lines = px.proc.count(r"failed \(not_tls\)")
            assert 1 <= lines <= 10, lines
            assert_no_crash(px.proc)
            rps = re.findall(r"([\d.]+) requests per second", out.replace("\r", "\n"))
            print(f"MEASURED 1000 plaintext/garbage connections to the TLS port in {flood:.2f} s "
                  f"beside redis-benchmark --tls (exit 0, {' / '.join(rps)} req/s); "
                  f"{lines} log lines")  # fmt: skip


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    with redis(tmp_path, "primary") as (_, pport):
        config = config_text(
            tmp_path,
            [("primary", pport, "primary")],
            extra=client_tls(certs.server, f'tls_client_ca = "{certs.ca}"'),
        )
        with run_proxy(config) as px:
            assert refused(px.port, certs.ca)
            assert refused(px.port, certs.ca, certs.other)  # signed by a CA it does not trust
            wait_until(
                "both refusals counted",
                lambda: (
                    metric(px.admin, f'{FAILURES}{{reason="no_client_cert"}}') == 1
                    and metric(px.admin, f'{FAILURES}{{reason="bad_client_cert"}}') == 1
                ),
            )
            px.proc.wait_for(r"failed \(no_client_cert\)")
            px.proc.wait_for(r"failed \(bad_client_cert\): .*certificate verify failed")
            assert redis_cli_tls(px.port, certs.ca, "PING", pair=certs.client) == "PONG"
            with tls_client(px.port, certs.ca, certs.client) as s:
                assert ping(s) == b"+PONG\r\n"
            assert metric(px.admin, "replicaproxy_sessions_total") == 2
            assert_no_crash(px.proc)


# ---------------------------------------------------------------------- backends


def test_a_backend_certificate_that_fails_verification_is_a_connect_failure(
    tmp_path: Path,
) -> None:
    """A replica whose certificate no trusted CA signed, and a shadow whose certificate is
    for another name: neither is ever sent a byte; the log says why; the replica is stale,
    the client served by the primary."""
    certs = make_certs(tmp_path / "certs")
    for name in ("p", "r", "s"):
        (tmp_path / name).mkdir()
    s, o = certs.server, certs.other
    with (
        redis_tls(tmp_path / "p", "primary", s.cert, s.key, certs.ca) as (_, _pport, ptls),
        redis_tls(tmp_path / "r", "replica", o.cert, o.key, certs.ca) as (_, rport, rtls),
        redis_tls(tmp_path / "s", "shadow", s.cert, s.key, certs.ca) as (_, sport, stls),
    ):
        config = config_text(
            tmp_path,
            [
                ("primary", ptls, "primary", backend_tls(certs)),
                ("replica", rtls, "replica", backend_tls(certs)),
                ("shadow", stls, "shadow",
                 backend_tls(certs, extra='tls_server_name = "db.example.com"')),
            ],
            # One check at start (fall = 1): it finds the replica and the shadow down;
            # the next is a minute away, so the session meets the shadow's name itself.
            health="interval = 60\ntimeout = 1\nfall = 1\nrise = 1",
        )  # fmt: skip
        with run_proxy(config) as px:
            px.proc.wait_for(
                r"health: replica is down: TLS: certificate verify failed: "
                r"unable to get local issuer certificate"
            )
            px.proc.wait_for(r"health: shadow is down: TLS: certificate verify failed: Hostname")
            with socket.create_connection((HOST, px.port), timeout=WAIT) as c:
                assert ping(c) == b"+PONG\r\n"
            px.proc.wait_for(
                r"cannot connect to shadow \(127\.0\.0\.1:\d+\): TLS: certificate verify "
                r"failed: Hostname mismatch, certificate is not valid for 'db\.example\.com'"
            )
            assert px.states()["replica"] == "stale"
            assert redis_cli(rport, "DBSIZE") == "0"
            assert redis_cli(sport, "DBSIZE") == "0"
            assert_no_crash(px.proc)


# ------------------------------------------------------------- reload and admin


def test_sighup_swaps_the_certificate_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    """Certificates renewed in place (same paths) are read again by SIGHUP or
    `ctl reload`: new clients see the new one, open sessions go on; a key that does
    not fit its certificate is refused and the old pair kept. The admin API speaks
    HTTPS with the same files, and ctl talks to it with --cacert."""
    certs = make_certs(tmp_path / "certs")
    live = Pair(tmp_path / "live.pem", tmp_path / "live.key")
    shutil.copy(certs.server.cert, live.cert)
    shutil.copy(certs.server.key, live.key)
    with redis(tmp_path, "primary") as (_, pport):
        config = config_text(
            tmp_path,
            [("primary", pport, "primary")],
            extra=client_tls(live),
            admin=client_tls(live),
        )
        with run_proxy(config, cacert=certs.ca) as px:
            assert px.status()["primary"] == "primary"  # ctl over HTTPS
            before = tls_client(px.port, certs.ca)
            with before:
                assert ping(before) == b"+PONG\r\n"
                # Renewed: a certificate from another CA, written over the old files.
                renewed = make_pair(tmp_path, "renewed", (certs.other_ca, certs.other_ca_key))
                shutil.copy(renewed.cert, live.cert)
                shutil.copy(renewed.key, live.key)
                began = time.monotonic()
                px.proc.signal(signal.SIGHUP)
                px.proc.wait_for(r"reloaded the config: .*TLS for clients: files re-read")
                took = time.monotonic() - began
                assert ping(before) == b"+PONG\r\n"  # the open session goes on
            with tls_client(px.port, certs.other_ca) as s:
                peer = s.getpeercert()
                assert peer is not None
                assert peer["subject"] == ((("commonName", "renewed"),),)
                assert ping(s) == b"+PONG\r\n"
            with pytest.raises(ssl.SSLCertVerificationError):
                tls_client(px.port, certs.ca).close()
            # The admin API took the new pair too.
            refused_ctl = px.ctl("status")
            assert refused_ctl.returncode == 1
            assert "certificate verify failed" in refused_ctl.stderr
            px.cacert = certs.other_ca
            assert px.status()["tls"] is True
            # A key that is not the certificate's: refused, the running pair kept.
            shutil.copy(certs.client.key, live.key)
            out = px.ctl("reload")
            assert out.returncode == 1
            assert "tls_key" in out.stderr and "is not the key of the certificate" in out.stderr
            with tls_client(px.port, certs.other_ca) as s:
                assert ping(s) == b"+PONG\r\n"
            assert_no_crash(px.proc)
            print(f"MEASURED certificate swapped by SIGHUP, logged {took * 1000:.0f} ms after "
                  "the signal; the session from before answered after it")  # fmt: skip


# ---------------------------------------------------------------------- check


@pytest.mark.parametrize(
    ("table", "key", "bad", "message"),
    [
        ("proxy", "tls_cert", "missing", r"proxy\.tls_cert: cannot read '.*nope\.pem': No such"),
        ("proxy", "tls_key", "other key", r"proxy\.tls_key: '.*' is not the key of the cert"),
        ("proxy", "tls_client_ca", "not a CA", r"proxy\.tls_client_ca: no PEM certificate in"),
        ("backend", "tls_ca", "not a CA", r"backend 'primary'\.tls_ca: no PEM certificate"),
        ("backend", "tls_key", "other key", r"backend 'primary'\.tls_key: '.*' is not the key"),
        ("admin", "tls_key", "missing", r"admin\.tls_key: cannot read '.*nope\.pem'"),
    ],
)
def test_check_names_the_tls_file_at_fault(
    tmp_path: Path, table: str, key: str, bad: str, message: str
) -> None:
    certs = make_certs(tmp_path / "certs")
    wrong = {
        "missing": tmp_path / "nope.pem",
        "other key": certs.other.key,
        "not a CA": certs.server.key,
    }[bad]
    good = {
        "tls_cert": certs.server.cert,
        "tls_key": certs.server.key,
        "tls_client_ca": certs.ca,
        "tls_ca": certs.ca,
    }
    keys = ["tls_cert", "tls_key"] + (["tls_client_ca"] if key == "tls_client_ca" else [])
    if table == "backend":
        keys = ["tls_ca", "tls_cert", "tls_key"]
    given = "\n".join(f'{k} = "{wrong if k == key else good[k]}"' for k in keys)
    more = f"tls = true\n{given}" if table == "backend" else ""
    config = config_text(
        tmp_path,
        [("primary", 6379, "primary", more)],
        extra=given if table == "proxy" else "",
        admin=given if table == "admin" else "",
    )
    out = subprocess.run(
        replicaproxy("check", config), capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 2, out.stdout
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"replicaproxy: error: {config}: ")
    assert re.search(message, lines[0]), lines[0]
