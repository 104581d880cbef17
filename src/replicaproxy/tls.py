"""TLS contexts built from the config's files, and the names of the ways a handshake fails.

Three places speak TLS: the client listener (``[proxy] tls_cert``), the admin API
(``[admin] tls_cert``) and each backend with ``tls = true``. Their contexts are built
here, from PEM files, at start and at every reload (so a certificate renewed in place
is picked up by SIGHUP). A file that cannot serve is a :class:`TlsFileError` that says
which of the files (``cert``, ``key``, ``ca``) is at fault; config.py turns it into a
one-line error naming the key.

Only the standard library: config.py imports this module, and mypyc type-checks
whatever the compiled data path imports in a build environment without our
dependencies.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "CLOSED",
    "FAILURES",
    "TLS_VERSIONS",
    "ClientTls",
    "TlsFileError",
    "TlsVersion",
    "agreed_socket",
    "client_context",
    "handshake_failure",
    "reload_pair",
    "server_context",
    "ssl_message",
]

TlsVersion = Literal["TLSv1.2", "TLSv1.3"]
TLS_VERSIONS: tuple[str, ...] = get_args(TlsVersion)
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

FileRole = Literal["cert", "key", "ca"]


class TlsFileError(Exception):
    """A certificate, key or CA file that cannot be used; ``role`` says which one."""

    def __init__(self, role: FileRole, message: str) -> None:
        super().__init__(message)
        self.role: FileRole = role
        self.message = message


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How the proxy speaks TLS to one backend: the context, and the name it checks."""

    context: ssl.SSLContext
    #: Sent as SNI and checked against the backend's certificate (a DNS name or an IP).
    server_name: str
    #: Sent in the clear before the handshake, where the protocol asks for TLS itself
    #: (PostgreSQL's SSLRequest); the server must answer ``S``. Empty: TLS at once.
    preface: bytes = b""


async def agreed_socket(host: str, port: int, preface: bytes) -> socket.socket:
    """A socket connected to ``host:port`` whose server agreed to TLS: ``preface`` sent,
    ``S`` read (the caller bounds the time). Raises ConnectionRefusedError naming the
    answer when the server declines (PostgreSQL without ``ssl = on`` says ``N``)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, preface)
            answer = await loop.sock_recv(sock, 1)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        if answer != b"S":
            sock.close()
            said = "nothing" if not answer else repr(answer.decode("latin-1"))
            raise ConnectionRefusedError(f"TLS: the server answered {said}, not S: is its TLS on?")
        return sock
    raise error


# ------------------------------------------------------------------------ contexts


def server_context(
    cert: str, key: str = "", *, client_ca: str = "", min_version: str = "TLSv1.2"
) -> ssl.SSLContext:
    """A server context with ``cert``'s chain and ``key`` (empty: the key is in ``cert``).

    With ``client_ca``, clients must present a certificate signed by a CA in that file.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version]
    _load_pair(context, cert, key)
    if client_ca:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(*, ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` (empty: the system's CAs)
    and its name, presenting ``cert`` and ``key`` when given (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # (verifies certificate and name)
    if ca:
        _load_ca(context, ca)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert:
        _load_pair(context, cert, key)
    return context


def reload_pair(context: ssl.SSLContext, cert: str, key: str = "") -> None:
    """Load ``cert`` and ``key`` into a context in use: its next handshakes use them.

    They are checked on a context of their own first, so a bad pair leaves ``context``
    as it was (OpenSSL would otherwise keep the new certificate with the old key).
    """
    _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
    context.load_cert_chain(cert, key or None, password=_no_password)


def _read(path: str, role: FileRole) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsFileError(role, f"cannot read {path!r}: {exc.strerror or exc}") from None


def _certificates(path: str, role: FileRole) -> None:
    """Raise unless ``path`` holds at least one PEM certificate."""
    data = _read(path, role)
    try:
        text = data.decode("ascii")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (UnicodeDecodeError, ssl.SSLError):
        raise TlsFileError(role, f"no PEM certificate in {path!r}") from None


def _no_password() -> str:
    # Without a password callback OpenSSL would ask on the terminal, and a reload would
    # wait for an answer that never comes.
    raise TlsFileError("key", "is encrypted with a passphrase, which the proxy cannot ask for")


def _load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    _certificates(cert, "cert")
    where = key or cert
    if key:
        _read(key, "key")
    try:
        context.load_cert_chain(cert, key or None, password=_no_password)
    except TlsFileError as exc:
        raise TlsFileError("key", f"{where!r} {exc.message}") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError(
                "key", f"{where!r} is not the key of the certificate in {cert!r}"
            ) from None
        if not key:
            raise TlsFileError(
                "key", f"no private key in {cert!r}: give the key's file, or append the key"
            ) from None
        raise TlsFileError("key", f"no private key in {key!r} (PEM expected)") from None
    except OSError as exc:  # the file changed under us since _read
        raise TlsFileError("key", f"cannot read {where!r}: {exc.strerror or exc}") from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    _certificates(ca, "ca")
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:  # (an SSLError is an OSError)
        raise TlsFileError("ca", f"cannot load CA certificates from {ca!r}: {exc}") from None


# ---------------------------------------------------------------- failed handshakes

#: The ways a client's handshake fails, as the ``reason`` label of
#: ``replicaproxy_tls_handshake_failures_total`` and in the log.
FAILURES = {
    "not_tls": "not a TLS client hello: plaintext or garbage on the TLS port",
    "version": "the client offers no TLS version the proxy accepts (tls_min_version)",
    "no_client_cert": "the client sent no certificate, and proxy.tls_client_ca asks for one",
    "bad_client_cert": "the client's certificate is not signed by proxy.tls_client_ca",
    "cert_refused": "the client refused the proxy's certificate",
    "timeout": "no complete handshake within the time allowed",
    "closed": "the client closed or reset the connection before the handshake ended",
    "other": "the handshake failed",
}
#: Connections that end before a handshake begins (a load balancer's TCP check, a
#: port scan) are named so: counted, but not worth a log line each.
CLOSED = "closed"

_NOT_TLS = frozenset(
    {
        "WRONG_VERSION_NUMBER",  # the first bytes are no TLS record (plaintext, garbage)
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "UNKNOWN_PROTOCOL",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LENGTH_MISMATCH",
        "LENGTH_MISMATCH",
        "BAD_PACKET_LENGTH",
        "UNEXPECTED_RECORD",
        "UNEXPECTED_MESSAGE",
    }
)
_VERSION = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "TLSV1_ALERT_PROTOCOL_VERSION",
    }
)
_NO_CLIENT_CERT = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE"})
# Alerts a client sends when it does not accept the proxy's certificate.
_CERT_REFUSED = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)


def handshake_failure(exc: BaseException) -> str:
    """Which of :data:`FAILURES` a client's failed handshake was, from its exception.

    (The names come from what asyncio's and uvloop's TLS protocol report: an
    ``ssl.SSLError`` from OpenSSL, ``ConnectionAbortedError`` when the handshake
    timed out, ``ConnectionResetError`` when the client closed or reset first.)
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "bad_client_cert"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _NOT_TLS:
            return "not_tls"
        if reason in _VERSION:
            return "version"
        if reason in _NO_CLIENT_CERT:
            return "no_client_cert"
        if reason in _CERT_REFUSED:
            return "cert_refused"
        if reason in ("CERTIFICATE_VERIFY_FAILED", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return "bad_client_cert"
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "closed"
        return "other"
    if isinstance(exc, ConnectionAbortedError | TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return "closed"
    return "other"


def ssl_message(exc: ssl.SSLError) -> str:
    """OpenSSL's words for ``exc``, without the ``[SSL: CODE]`` and ``(_ssl.c:N)`` around them.

    ``certificate verify failed: self-signed certificate``, ``wrong version number``.
    """
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    if text.startswith("["):
        text = text.partition("] ")[2] or text
    head, sep, tail = text.rpartition(" (_ssl.c:")
    if sep and tail.endswith(")"):
        text = head
    return text or type(exc).__name__
