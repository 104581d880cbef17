"""The demo protocol's server: prints what each client sends, replies ``HOLA``.

stdout carries only the received values, one per line as Java prints them, so the
output of several servers (primary, replicas, the Java original) can be compared
directly. Connection chatter and peer errors go to the log (stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

from replicaproxy.demo.protocol import ProtocolError, ServerParser

__all__ = ["CLOSE_TIMEOUT", "format_address", "serve_example"]

logger = logging.getLogger(__name__)

#: How long to wait for the client's close after its last value, to notice bytes it
#: sends past the end. The classroom client closes right after its last write, so
#: this only bounds a client (or proxy) that keeps the connection open.
CLOSE_TIMEOUT: Final = 5.0
# Bytes per read; the whole client stream is 56 bytes, so any size works.
_READ_SIZE: Final = 4096


def format_address(address: Any) -> str:
    """Format a socket address as ``host:port`` (``[v6host]:port`` for IPv6)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unknown peer" if address is None else str(address)


async def _await_close(reader: asyncio.StreamReader, parser: ServerParser) -> bool:
    """Read to the client's EOF (False if it does not come within ``CLOSE_TIMEOUT``)."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT) as timeout:
            while data := await reader.read(_READ_SIZE):
                parser.feed(data)  # raises: nothing may follow the last value
    except TimeoutError:
        if timeout.expired():
            return False
        raise  # ETIMEDOUT from the socket: a connection error
    return True


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, out: Callable[[str], None]
) -> None:
    """Serve one client: print its values, reply after the first message, then close."""
    peer = format_address(writer.get_extra_info("peername"))
    logger.info("%s: connected", peer)
    parser = ServerParser()
    try:
        while not parser.done:
            data = await reader.read(_READ_SIZE)
            if not data:
                parser.eof()  # raises: the stream is short
            for line in parser.feed(data):
                out(line)
            if parser.reply_due:
                writer.write(parser.take_reply())
                await writer.drain()
        if await _await_close(reader, parser):
            logger.info("%s: done", peer)
        else:
            logger.warning(
                "%s: still open %.1f s after its last value; closing it", peer, CLOSE_TIMEOUT
            )
    except ProtocolError as exc:
        for line in exc.lines:
            out(line)
        logger.warning("%s: %s", peer, exc)
        if parser.reply_due:
            # The first message was complete, in the same read as the bad bytes: reply
            # anyway, so what the server sends does not depend on how reads were split.
            with contextlib.suppress(OSError):
                writer.write(parser.take_reply())
                await writer.drain()
    except OSError as exc:
        logger.warning("%s: connection error: %s", peer, exc)
    except Exception:
        # A bug in this module, not the peer's fault: the one place a traceback is due.
        logger.exception("%s: unexpected error", peer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def serve_example(
    host: str,
    port: int,
    *,
    out: Callable[[str], None] = print,
    ready: Callable[[str, int], None] | None = None,
    once: bool = False,
) -> None:
    """Run the demo server on ``host:port`` until cancelled (or after one client if ``once``).

    Each connection is served independently; a client that closes early or sends
    bytes past the end gets a one-line warning with its address and the server goes
    on. ``out`` receives every value as Java prints it. When bound, logs
    ``example server listening on HOST:PORT`` and calls ``ready(host, port)`` with the
    real address (the real port when ``port`` is 0). With ``once``, the listener
    closes at the first connection and the call returns when that client is done.
    """
    handlers: set[asyncio.Task[None]] = set()
    first_done = asyncio.Event()
    accepted = False
    server: asyncio.Server | None = None

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        if once and accepted:
            # Accepted before the listener closed; ``once`` serves exactly one client.
            writer.close()
            return
        accepted = True
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            if once and server is not None:
                server.close()
            await _handle(reader, writer, out)
        finally:
            handlers.discard(task)
            first_done.set()

    server = await asyncio.start_server(on_connect, host, port)
    try:
        addresses = [sock.getsockname() for sock in server.sockets]
        for address in addresses:
            logger.info("example server listening on %s", format_address(address))
        if ready is not None:
            bound = addresses[0]
            ready(str(bound[0]), int(bound[1]))
        if once:
            await first_done.wait()
        else:
            await server.serve_forever()
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()
