"""A bulk sink for the benchmarks: reads each connection to EOF, answers the byte count."""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports behave as asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(f"{self.count}\n".encode())
        self.transport.close()
        return True


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
