"""Load generators for the benchmarks that redis-benchmark does not cover.

Each prints one JSON object on stdout; ``bench/run.py`` runs them as child processes
so that their CPU is never counted as the proxy's and they get a fresh event loop.

- ``bulk PORT BYTES``: one connection writes BYTES as fast as it can (256 KiB
  writes from one preallocated buffer, blocking ``sendall``: the copy happens in the
  kernel, so the sender is not the bottleneck), half-closes, and waits for the sink
  (``bulk_sink.py``) to answer the count it received. Throughput is end to end: from the
  first write to the sink's acknowledgement.
- ``churn PORT COUNT [--concurrency C]``: COUNT connections, C at a time, each
  sending one Redis ``PING`` and waiting for ``+PONG`` before closing. (The churn
  workload itself runs ``redis-benchmark -k 0``, which is faster than this and than
  the proxies; this warms up a run that has no redis-benchmark workload.)
- ``idle PORT COUNT [--concurrency C]``: opens COUNT connections, makes one
  ``PING`` round trip on each (so every session is fully set up, upstreams
  included), prints ``{"opened": COUNT}`` and holds them until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

HOST = "127.0.0.1"
# Any single network wait; far above what a loopback round trip takes even on a busy
# machine, so hitting it means something is stuck, not slow.
TIMEOUT = 60.0
CHUNK = 256 * 1024
PING = b"PING\r\n"
PONG = b"+PONG\r\n"


def run(main: Coroutine[Any, Any, dict[str, float]]) -> dict[str, float]:
    """Run ``main`` on uvloop when it is installed (it is a dependency of replicaproxy)."""
    try:
        import uvloop
    except ImportError:  # the plain asyncio loop works too, only slower
        return asyncio.run(main)
    result: dict[str, float] = uvloop.run(main)
    return result


def bulk(port: int, total: int, chunk: int = CHUNK) -> dict[str, float]:
    """Write ``total`` bytes through ``port`` and wait for the sink to confirm them."""
    data = memoryview(bytes(chunk))
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            sock.sendall(data[:n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            got = sock.recv(64)
            if not got:
                break
            answer += got
        elapsed = time.perf_counter() - start
    if answer.strip() != str(total).encode():
        raise SystemExit(f"bulk: the sink answered {answer!r}, expected {total}")
    return {"bytes": total, "seconds": elapsed, "mib_s": total / elapsed / (1 << 20)}


async def _ping(loop: asyncio.AbstractEventLoop, port: int) -> socket.socket:
    """A connected socket that has made one PING/+PONG round trip."""
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (HOST, port))
        await loop.sock_sendall(sock, PING)
        answer = b""
        while len(answer) < len(PONG):
            got = await loop.sock_recv(sock, 64)
            if not got:
                break
            answer += got
        if answer != PONG:
            raise ConnectionError(f"expected {PONG!r}, got {answer!r}")
    except BaseException:
        sock.close()
        raise
    return sock


async def _spread(count: int, concurrency: int, job: Callable[[], Awaitable[None]]) -> None:
    """Run ``job`` ``count`` times, at most ``concurrency`` at once."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await asyncio.wait_for(job(), TIMEOUT)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))


async def churn(port: int, count: int, concurrency: int) -> dict[str, float]:
    """Connections per second, each one PING round trip and a close."""
    loop = asyncio.get_running_loop()

    async def one() -> None:
        (await _ping(loop, port)).close()

    start = time.perf_counter()
    await _spread(count, concurrency, one)
    elapsed = time.perf_counter() - start
    return {"count": count, "seconds": elapsed, "conn_s": count / elapsed}


async def idle(port: int, count: int, concurrency: int) -> dict[str, float]:
    """Open ``count`` sessions, report, and hold them until stdin reaches EOF."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    async def one() -> None:
        socks.append(await _ping(loop, port))

    start = time.perf_counter()
    try:
        await _spread(count, concurrency, one)
        opened = {"opened": len(socks), "seconds": time.perf_counter() - start}
        print(json.dumps(opened), flush=True)
        # The parent reads the proxy's memory now, then closes our stdin.
        await asyncio.to_thread(sys.stdin.buffer.read)
    finally:
        for s in socks:
            s.close()
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("bulk", help="one-way stream into a sink")
    p.add_argument("port", type=int)
    p.add_argument("bytes", type=int)
    p.add_argument("--chunk", type=int, default=CHUNK)
    for name, text in (("churn", "a new connection per PING"), ("idle", "hold connections")):
        p = sub.add_parser(name, help=text)
        p.add_argument("port", type=int)
        p.add_argument("count", type=int)
        p.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    if args.what == "bulk":
        result = bulk(args.port, args.bytes, args.chunk)
    elif args.what == "churn":
        result = run(churn(args.port, args.count, args.concurrency))
    else:
        result = run(idle(args.port, args.count, args.concurrency))
    if result:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
