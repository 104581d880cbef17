"""A test backend: counts and hashes each connection's input.

For each connection it prints ``open``, reads until EOF, then answers ``<bytes> <sha256>\\n``
and closes; it prints ``conn <bytes> <sha256> eof`` (or ``reset``) on stdout,
so a test can check that a backend received exactly the client's stream.
With ``--echo`` it also echoes every chunk back as it arrives.
Run: ``python sink.py [--port N] [--echo]``; it logs ``listening on HOST:PORT`` on stderr.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, echo: bool) -> None:
    h = hashlib.sha256()
    n = 0
    how = "eof"
    print("open", flush=True)
    try:
        while data := await reader.read(1 << 16):
            n += len(data)
            h.update(data)
            if echo:
                writer.write(data)
                await writer.drain()
        writer.write(f"{n} {h.hexdigest()}\n".encode())
        await writer.drain()
    except OSError:
        how = "reset"
    finally:
        print(f"conn {n} {h.hexdigest()} {how}", flush=True)
        writer.close()


async def main() -> None:
    echo = "--echo" in sys.argv
    port = int(sys.argv[sys.argv.index("--port") + 1]) if "--port" in sys.argv else 0
    server = await asyncio.start_server(lambda r, w: handle(r, w, echo), "127.0.0.1", port)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
