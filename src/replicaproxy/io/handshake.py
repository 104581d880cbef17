"""TLS on the client listener: each connection's handshake, before its session.

The loop's own TLS listener (``create_server(ssl=...)``) ends a failed handshake in
silence: the application never hears of the connection, let alone why it failed. So
a TLS listener here is a plain TCP one whose protocol factory, :class:`TlsListener`,
does what the loop's own would do (the loop's TLS protocol class, with the same
arguments), with a waiter of ours: its outcome says how the handshake ended, and a
failure goes to ``on_failure`` with the exception and the client's address. After a
handshake the session's protocol gets the decrypted stream and never knows TLS was
there, so every backend is fed exactly what the client wrote.

:func:`quiet_tls_reports` keeps the loop's reports about TLS connections that are already
gone (uvloop's TLS protocol writing to a socket that was just closed) out of the log as
tracebacks: a peer's doing or a race in the loop, never a bug of ours to read.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

__all__ = ["HANDSHAKE_TIMEOUT", "TlsListener", "quiet_tls_reports"]

log = logging.getLogger(__name__)

#: Seconds a client has to complete its handshake. A handshake is two round trips and
#: a signature: milliseconds on a LAN, under a second across continents; 10 s leaves
#: room for a few lost packets (TCP retransmits after 1, 2, 4 s) and frees the
#: descriptor of a client that never starts six times sooner than asyncio's 60 s.
HANDSHAKE_TIMEOUT = 10.0

_classes: dict[Any, Any] = {}


def _handshake_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own TLS protocol class, made to remember the client's address.

    uvloop's (compiled) class under uvloop, asyncio's otherwise: the one the loop's
    ``create_server(ssl=...)`` would use, with the same constructor.
    """
    base: Any = asyncio.sslproto.SSLProtocol
    try:
        import uvloop
        import uvloop.loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    else:
        if isinstance(loop, uvloop.Loop):
            base = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # (not in its stub)
    made = _classes.get(base)
    if made is None:

        def connection_made(self: Any, transport: asyncio.BaseTransport) -> None:
            self.peer = transport.get_extra_info("peername")
            base.connection_made(self, transport)

        made = _classes[base] = type(
            "ClientHandshake", (base,), {"connection_made": connection_made, "peer": None}
        )
    return made


def _show(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return "an unknown address" if peer is None else str(peer)


class _Refused(asyncio.Protocol):
    """A connection turned away before its handshake: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class TlsListener:
    """The protocol factory of a TLS listener: a handshake, then ``app()``'s protocol.

    ``context`` may be replaced at any time (a reload): each new handshake uses the one
    here then, connections already open keep theirs. While ``admit()`` answers False,
    new connections are closed before their handshake.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        app: Callable[[], asyncio.BaseProtocol],
        on_failure: Callable[[BaseException, str], None],
        *,
        admit: Callable[[int], bool] | None = None,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.context = context
        #: Handshakes begun and not yet ended.
        self.handshakes = 0
        self._app = app
        self._on_failure = on_failure
        self._admit = admit
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._class = _handshake_class(self._loop)

    def __call__(self) -> asyncio.BaseProtocol:
        if self._admit is not None and not self._admit(self.handshakes):
            return _Refused()
        waiter: asyncio.Future[None] = self._loop.create_future()
        protocol = self._class(
            self._loop,
            self._app(),
            self.context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=self._timeout,
        )
        self.handshakes += 1
        waiter.add_done_callback(lambda done: self._ended(done, protocol))
        return protocol  # type: ignore[no-any-return]

    def _ended(self, waiter: asyncio.Future[None], protocol: Any) -> None:
        self.handshakes -= 1
        if waiter.cancelled():
            return
        exc = waiter.exception()
        if exc is not None:
            self._on_failure(exc, _show(protocol.peer))


def _tls_protocols() -> tuple[type, ...]:
    classes: list[type] = [asyncio.sslproto.SSLProtocol]
    try:
        import uvloop.loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    else:
        classes.append(uvloop.loop.SSLProtocol)  # type: ignore[attr-defined]
    return tuple(classes)


def _closed_tls(context: dict[str, Any]) -> bool:
    """Whether the loop reports a TLS connection's end, not a bug.

    uvloop's TLS protocol reports what it meets on a socket that was just closed (an
    abort while data it had read was still being decrypted: a ``RuntimeError`` "the
    handler is closed") or a connection error, through the loop's exception handler,
    which prints a traceback. Everything else it reports is left to print.
    """
    if not isinstance(context.get("protocol"), _tls_protocols()):
        return False
    exc = context.get("exception")
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and "is closed" in str(exc)


def quiet_tls_reports(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Have ``loop`` log reports about TLS connections already gone as one debug line;
    other reports go where they went. Returns what puts the old handler back."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _closed_tls(context):
            log.debug(
                "TLS connection already closed: %s: %r",
                context.get("message", ""),
                context.get("exception"),
            )
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)
