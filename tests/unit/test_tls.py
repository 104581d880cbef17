"""Tier 1: TLS contexts from files, the names of failed handshakes, the listener's
handshake wrapper on both event loops, and the loop reports kept out of the log.

Handshakes here are real (OpenSSL in memory, or on loopback); the certificates are
made by tests/support.py with the openssl program.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import logging
import re
import socket
import ssl
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from replicaproxy.config import Address, HealthConfig
from replicaproxy.health import probe
from replicaproxy.io.handshake import TlsListener, quiet_tls_reports
from replicaproxy.logutil import describe_error
from replicaproxy.tls import (
    FAILURES,
    ClientTls,
    TlsFileError,
    client_context,
    handshake_failure,
    reload_pair,
    server_context,
    ssl_message,
)
from support import Certs, make_certs, require_binary


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def in_memory(
    server: ssl.SSLContext, client: ssl.SSLContext | None, first: bytes = b""
) -> BaseException | None:
    """A handshake between two in-memory TLS ends (or ``first`` bytes from a client that
    is not one): the server's exception, None if it succeeded."""
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = None
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    if client is not None:
        cli = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    else:
        s_in.write(first)
    server_done = client_done = False
    for _ in range(10):
        if cli is not None and not client_done:
            try:
                cli.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                client_done = True  # (the alert it sent tells the server)
            s_in.write(c_out.read())
        try:
            srv.do_handshake()
            server_done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            return exc
        c_in.write(s_out.read())
        if server_done and (cli is None or client_done):
            if cli is not None:  # TLS 1.3: the server learns a client's verdict late
                try:
                    srv.read(1)
                except ssl.SSLWantReadError:
                    return None
                except ssl.SSLError as exc:
                    return exc
            return None
    raise AssertionError("the handshake went nowhere")


# ------------------------------------------------------------------------ files


def test_contexts_from_good_files(certs: Certs) -> None:
    context = server_context(str(certs.server.cert), str(certs.server.key))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    mtls = server_context(
        str(certs.server.cert),
        str(certs.server.key),
        client_ca=str(certs.ca),
        min_version="TLSv1.3",
    )
    assert mtls.verify_mode == ssl.CERT_REQUIRED
    assert mtls.minimum_version == ssl.TLSVersion.TLSv1_3
    client = client_context(ca=str(certs.ca))
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    assert in_memory(context, client) is None


def test_the_key_may_sit_in_the_certificate_file(certs: Certs, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(certs.server.cert.read_bytes() + certs.server.key.read_bytes())
    server_context(str(both))
    with pytest.raises(TlsFileError) as info:
        server_context(str(certs.server.cert))
    assert info.value.role == "key"
    assert "no private key in" in info.value.message


@pytest.mark.parametrize(
    ("files", "role", "message"),
    [
        ({"cert": "missing"}, "cert", "cannot read '.*missing': No such file"),
        ({"cert": "server.key"}, "cert", "no PEM certificate in '.*server.key'"),
        ({"key": "other.key"}, "key", "'.*other.key' is not the key of the certificate in"),
        ({"key": "server.pem"}, "key", "no private key in '.*server.pem'"),
        ({"key": "encrypted.key"}, "key", "is encrypted with a passphrase"),
        ({"ca": "server.key"}, "ca", "no PEM certificate in '.*server.key'"),
        ({"ca": "garbage"}, "ca", "no PEM certificate in '.*garbage'"),
    ],
)
def test_file_errors_say_which_file(
    certs: Certs, tmp_path: Path, files: dict[str, str], role: str, message: str
) -> None:
    folder = certs.ca.parent
    (tmp_path / "garbage").write_bytes(b"\x00\xff" * 100)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [require_binary("openssl"), "pkey", "-in", str(certs.server.key), "-out",
         str(encrypted), "-aes256", "-passout", "pass:secret"],
        check=True, capture_output=True,
    )  # fmt: skip

    def path(name: str) -> str:
        for where in (tmp_path / name, folder / name):
            if where.exists():
                return str(where)
        return str(tmp_path / name)

    given = {"cert": "server.pem", "key": "server.key", "ca": "ca.pem", **files}
    with pytest.raises(TlsFileError) as info:
        server_context(path(given["cert"]), path(given["key"]), client_ca=path(given["ca"]))
    assert info.value.role == role
    assert re.search(message, info.value.message), info.value.message


def test_reload_pair_leaves_a_context_alone_when_the_pair_is_bad(certs: Certs) -> None:
    context = server_context(str(certs.server.cert), str(certs.server.key))
    with pytest.raises(TlsFileError):
        reload_pair(context, str(certs.server.cert), str(certs.other.key))
    # Still the first pair: a client trusting the first CA gets through.
    assert in_memory(context, client_context(ca=str(certs.ca))) is None
    reload_pair(context, str(certs.other.cert), str(certs.other.key))
    assert in_memory(context, client_context(ca=str(certs.other_ca))) is None


# ------------------------------------------------------------ failed handshakes


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (b"*1\r\n$4\r\nPING\r\n", "not_tls"),
        (b"PING\r\n", "not_tls"),
        (b"GET / HTTP/1.1\r\n\r\n", "not_tls"),
        (bytes(range(256)), "not_tls"),
    ],
)
def test_what_is_not_a_client_hello_is_not_tls(certs: Certs, first: bytes, reason: str) -> None:
    server = server_context(str(certs.server.cert), str(certs.server.key))
    exc = in_memory(server, None, first)
    assert exc is not None
    assert handshake_failure(exc) == reason


def test_failed_handshakes_are_named(certs: Certs) -> None:
    cert, key = str(certs.server.cert), str(certs.server.key)
    strict = server_context(cert, key, min_version="TLSv1.3")
    old = client_context(ca=str(certs.ca))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake_failure(_failed(in_memory(strict, old))) == "version"

    mtls = server_context(cert, key, client_ca=str(certs.ca))
    assert handshake_failure(_failed(in_memory(mtls, client_context(ca=str(certs.ca))))) == (
        "no_client_cert"
    )
    stranger = client_context(
        ca=str(certs.ca), cert=str(certs.other.cert), key=str(certs.other.key)
    )
    exc = _failed(in_memory(mtls, stranger))
    assert handshake_failure(exc) == "bad_client_cert"
    assert isinstance(exc, ssl.SSLError)
    assert ssl_message(exc).startswith("certificate verify failed: ")

    plain = server_context(cert, key)
    distrustful = client_context(ca=str(certs.other_ca))
    assert handshake_failure(_failed(in_memory(plain, distrustful))) == "cert_refused"

    assert handshake_failure(ConnectionAbortedError("SSL handshake is taking longer")) == (
        "timeout"
    )
    assert handshake_failure(ConnectionResetError()) == "closed"
    assert handshake_failure(ValueError("?")) == "other"
    assert set(FAILURES) >= {"not_tls", "version", "no_client_cert", "bad_client_cert"}


def _failed(exc: BaseException | None) -> BaseException:
    assert exc is not None, "the handshake succeeded"
    return exc


def test_tls_errors_are_described_by_openssl_not_by_errno(certs: Certs) -> None:
    server = server_context(str(certs.server.cert), str(certs.server.key))
    exc = in_memory(server, None, b"PING\r\n")
    assert isinstance(exc, ssl.SSLError)
    # errno 1 is OpenSSL's SSL_ERROR_SSL, not EPERM ("Operation not permitted").
    assert describe_error(exc) == "TLS: wrong version number"


# ------------------------------------------------------- the listener, both loops


async def _listener_meets(certs: Certs) -> list[tuple[str, str]]:
    """A TlsListener on loopback met by plaintext, an early close and a real client."""
    loop = asyncio.get_running_loop()
    failures: list[tuple[str, str]] = []
    served: list[bytes] = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def data_received(self, data: bytes) -> None:
            served.append(data)
            self.transport.write(data)

    ended = asyncio.Event()

    def failed(exc: BaseException, peer: str) -> None:
        failures.append((handshake_failure(exc), peer))
        if len(failures) == 2:
            ended.set()

    factory = TlsListener(
        server_context(str(certs.server.cert), str(certs.server.key)), Echo, failed
    )
    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"PING\r\n")
        assert await r.read() == b""
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        async with asyncio.timeout(5):
            await ended.wait()
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(ca=str(certs.ca)), server_hostname="127.0.0.1"
        )
        w.write(b"hello")
        assert await r.readexactly(5) == b"hello"
        w.close()
        assert factory.handshakes == 0
    finally:
        server.close()
    assert served == [b"hello"]
    return failures


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_the_listener_names_each_failed_handshake_on_either_loop(
    certs: Certs, run: Callable[[Coroutine[Any, Any, list[tuple[str, str]]]], Any]
) -> None:
    failures = run(_listener_meets(certs))
    assert [reason for reason, _ in failures] == ["not_tls", "closed"]
    assert all(peer.startswith("127.0.0.1:") for _, peer in failures)


def test_a_client_that_never_finishes_its_handshake_is_timed_out(certs: Certs) -> None:
    async def silent() -> list[str]:
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        ended = asyncio.Event()

        def failed(exc: BaseException, peer: str) -> None:
            failures.append(handshake_failure(exc))
            ended.set()

        context = server_context(str(certs.server.cert), str(certs.server.key))
        factory = TlsListener(context, asyncio.Protocol, failed, timeout=0.2)
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(5):
                await ended.wait()
                with contextlib.suppress(ConnectionResetError):
                    assert await r.read() == b""
            w.close()
        finally:
            server.close()
        return failures

    assert uvloop.run(silent()) == ["timeout"]


async def test_the_listener_turns_clients_away_before_their_handshake(certs: Certs) -> None:
    loop = asyncio.get_running_loop()
    factory = TlsListener(
        server_context(str(certs.server.cert), str(certs.server.key)),
        asyncio.Protocol,
        lambda exc, peer: None,
        admit=lambda handshakes: False,
    )
    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionResetError):  # (closed, or reset)
            assert await r.read() == b""
        w.close()
        assert factory.handshakes == 0
    finally:
        server.close()


# ------------------------------------------------------------ the loop's reports


async def test_reports_about_closed_tls_connections_are_one_debug_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: seen.append(context))
    restore = quiet_tls_reports(loop)
    caplog.set_level(logging.DEBUG, logger="replicaproxy.io.handshake")
    waiter: asyncio.Future[None] = loop.create_future()
    tls = asyncio.sslproto.SSLProtocol(
        loop, asyncio.Protocol(), ssl.create_default_context(), waiter
    )
    try:
        closed = RuntimeError(
            "unable to perform operation on <TCPTransport>; the handler is closed"
        )
        loop.call_exception_handler(
            {"message": "Fatal error on SSL protocol", "exception": closed, "protocol": tls}
        )
        loop.call_exception_handler(
            {"message": "SSL error", "exception": ConnectionResetError(), "protocol": tls}
        )
        assert seen == []
        assert len([r for r in caplog.records if "already closed" in r.getMessage()]) == 2
        bug = ValueError("a bug")
        loop.call_exception_handler({"message": "x", "exception": bug, "protocol": tls})
        loop.call_exception_handler({"message": "y", "exception": closed})  # not TLS
        assert [c["message"] for c in seen] == ["x", "y"]
    finally:
        restore()
    loop.call_exception_handler({"message": "z", "exception": closed, "protocol": tls})
    assert [c["message"] for c in seen] == ["x", "y", "z"]
    loop.set_exception_handler(None)


# ------------------------------------------------------------------- health


async def test_a_health_probe_over_tls_checks_the_certificate(certs: Certs) -> None:
    context = server_context(str(certs.server.cert), str(certs.server.key))

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if await r.readexactly(6) == b"PING\r\n":
            w.write(b"+PONG\r\n")
            await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    addr = Address("127.0.0.1", port)
    check = HealthConfig(timeout=2.0, send=b"PING\r\n", expect=b"PONG")
    try:
        good = ClientTls(client_context(ca=str(certs.ca)), "127.0.0.1")
        assert await probe(addr, check, good) is None
        stranger = ClientTls(client_context(ca=str(certs.other_ca)), "127.0.0.1")
        error = await probe(addr, check, stranger)
        assert error == ("TLS: certificate verify failed: unable to get local issuer certificate")
        wrong_name = ClientTls(client_context(ca=str(certs.ca)), "db.example.com")
        error = await probe(addr, check, wrong_name)
        assert error is not None and "Hostname mismatch" in error
        # Plaintext to a TLS port fails the check instead of passing a bare connect.
        with socket.create_connection(("127.0.0.1", port)):
            pass
        assert await probe(addr, check) is not None
    finally:
        server.close()
        await server.wait_closed()
