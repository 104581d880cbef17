"""The bulk sink: reads each connection to EOF, discards it, answers the byte count.

``python bench/bulk_sink.py PORT`` listens on 127.0.0.1:PORT. For every connection it
counts the bytes received (into one reused buffer: no allocation per read), and at
the client's half-close writes ``COUNT\\n`` and closes. A connection that sends
nothing (a health check, a readiness probe) gets ``0\\n``. Replicas in the bulk
setups are sinks too, so they answer the same count as the primary.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, cast

HOST = "127.0.0.1"
# One read can take up to this much: 1 MiB is several socket buffers' worth on Linux
# (the default rmem is 128 KiB), so a fast sender never waits on our read size.
READ_BUFFER = 1 << 20


class Sink(asyncio.BufferedProtocol):
    """Counts what arrives; the buffer is shared because nothing looks at the bytes."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer
        self.count = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports behave as asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.count += nbytes

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write(b"%d\n" % self.count)
        self.transport.close()
        return True


async def serve(port: int) -> None:
    buffer = memoryview(bytearray(READ_BUFFER))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Sink(buffer), HOST, port, backlog=1024)
    async with server:
        await server.serve_forever()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (it is a dependency of replicaproxy)."""
    try:
        import uvloop
    except ImportError:  # the plain asyncio loop works too, only slower
        asyncio.run(main)
        return
    uvloop.run(main)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: sink.py PORT")
    run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
