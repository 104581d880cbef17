"""The demo protocol's client, behaving like the classroom Java client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

from replicaproxy.demo.protocol import (
    FIRST_MESSAGE,
    REPLY,
    SECOND_MESSAGE,
    ProtocolError,
    decode_text,
)

__all__ = ["CONNECT_DEADLINE", "RETRY_INTERVAL", "ConnectDeadlineError", "run_example_client"]

logger = logging.getLogger(__name__)

#: The classroom client retries its connect every 100 ms until the server is up.
RETRY_INTERVAL: Final = 0.1
#: The classroom client retries forever; we give up after this long so scripts and
#: tests cannot hang. Ten seconds covers a JVM or a proxy starting on a slow machine.
CONNECT_DEADLINE: Final = 10.0


class ConnectDeadlineError(ConnectionError):
    """No connection could be made before the connect deadline."""


async def _connect(
    host: str, port: int, retry_interval: float, connect_deadline: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, retrying every ``retry_interval`` s until ``connect_deadline`` s have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_deadline
    last_error: OSError | None = None
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.open_connection(host, port)
        except OSError as exc:  # refused, unreachable, unresolvable; TimeoutError too
            if not isinstance(exc, TimeoutError) or last_error is None:
                last_error = exc
        now = loop.time()
        if now >= deadline:
            reason = f": {last_error}" if last_error is not None else ""
            raise ConnectDeadlineError(
                f"could not connect to {host}:{port} within {float(connect_deadline)} s{reason}"
            ) from last_error
        logger.debug("connect to %s:%d failed (%s); retrying", host, port, last_error)
        await asyncio.sleep(min(retry_interval, deadline - now))


async def run_example_client(
    host: str,
    port: int,
    *,
    out: Callable[[str], None] = print,
    retry_interval: float = RETRY_INTERVAL,
    connect_deadline: float = CONNECT_DEADLINE,
) -> str:
    """Run one demo exchange against ``host:port`` and return the server's reply.

    Connects (retrying every ``retry_interval`` s, giving up with
    :class:`ConnectDeadlineError` after ``connect_deadline`` s), sends the first
    message, reads the 4-byte reply and passes it to ``out`` as the Java client prints
    it, sends the second message and closes. A server that closes before sending 4
    bytes raises :class:`ProtocolError`; other connection failures raise ``OSError``.
    """
    if connect_deadline <= 0 or retry_interval < 0:
        raise ValueError("connect_deadline must be > 0 and retry_interval >= 0")
    reader, writer = await _connect(host, port, retry_interval, connect_deadline)
    try:
        writer.write(FIRST_MESSAGE)
        await writer.drain()
        try:
            reply = await reader.readexactly(len(REPLY))
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(
                f"{host}:{port} closed the connection after {len(exc.partial)} "
                f"of {len(REPLY)} reply bytes"
            ) from None
        text = decode_text(reply)
        out(text)
        writer.write(SECOND_MESSAGE)
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return text
