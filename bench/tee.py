"""The least a replicating forwarder in Python can do: a floor for replicaproxy's costs.

``python bench/tee.py PORT PRIMARY [REPLICA ...] [--flush MS]`` listens on
127.0.0.1:PORT. Each client's bytes are written to the primary at once and added to
a batch per replica; one shared tick (20 ms by default, replicaproxy's replica_flush)
writes every batch with
``writelines``. The primary's replies go to the client; the replicas' are read and
thrown away. With no replica it is a bare forwarder.

This is the shape the issue's prototype had, and nothing more: no compare, no
failover, no limits on what it holds, no idle or connect timeouts. It is not for
use; ``bench/run.py`` runs it beside replicaproxy (setups ``tee0`` and ``tee1``) so
that the table shows what the same I/O costs with none of replicaproxy's work on
top. What ``tee1`` pays over ``tee0`` is the replica's I/O: a ``writev`` and a
``read`` per tick per session, whose count no code in the proxy can lower.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

HOST = "127.0.0.1"


class Tick:
    """Writes every session's replica batches, once per interval, while any are held."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.dirty: list[Session] = []

    def mark(self, session: Session) -> None:
        if not self.dirty:
            asyncio.get_running_loop().call_later(self.interval, self.fire)
        self.dirty.append(session)

    def fire(self) -> None:
        dirty, self.dirty = self.dirty, []
        for session in dirty:
            session.flush()


class Upstream(asyncio.Protocol):
    def __init__(self, session: Session, primary: bool) -> None:
        self.session = session
        self.primary = primary

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session.attach(cast(asyncio.Transport, transport), self.primary)

    def data_received(self, data: bytes) -> None:
        if self.primary:
            self.session.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.primary:
            self.session.close()


class Session(asyncio.Protocol):
    """One client: its primary, its replicas and their batches."""

    def __init__(self, primary: int, replicas: list[int], tick: Tick) -> None:
        self.ports = (primary, replicas)
        self.tick = tick
        self.client: asyncio.Transport  # set by connection_made
        self.primary: asyncio.Transport | None = None
        self.replicas: list[asyncio.Transport] = []
        self.batches: list[list[bytes]] = [[] for _ in replicas]
        self.early: list[bytes] = []  # input before the primary is there
        self.marked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        primary, replicas = self.ports
        try:
            for port in replicas:
                await loop.create_connection(lambda: Upstream(self, False), HOST, port)
            await loop.create_connection(lambda: Upstream(self, True), HOST, primary)
        except OSError:
            self.close()

    def attach(self, transport: asyncio.Transport, primary: bool) -> None:
        if self.client.is_closing():  # the client left while this one connected
            transport.close()
            return
        if not primary:
            self.replicas.append(transport)
            return
        self.primary = transport
        for data in self.early:
            self.send(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.primary is None:
            self.early.append(data)
        else:
            self.send(data)

    def send(self, data: bytes) -> None:
        assert self.primary is not None
        self.primary.write(data)
        for batch in self.batches:
            batch.append(data)
        if not self.marked:
            self.marked = True
            self.tick.mark(self)

    def flush(self) -> None:
        self.marked = False
        # (A client that left before every replica connected: fewer transports.)
        for transport, batch in zip(self.replicas, self.batches, strict=False):
            if not transport.is_closing():
                transport.writelines(batch)
            batch.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        self.flush()
        for t in (self.client, self.primary, *self.replicas):
            if t is not None:
                t.close()


async def serve(
    port: int, primary: int, replicas: list[int], flush_ms: float, reuse_port: bool = False
) -> None:
    tick = Tick(flush_ms / 1000)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Session(primary, replicas, tick), HOST, port, reuse_port=reuse_port
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("primary", type=int)
    parser.add_argument("replicas", type=int, nargs="*")
    parser.add_argument("--flush", type=float, default=20.0, help="the tick in ms (default 20)")
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT: several tees on one port share the connections",
    )
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.port, args.primary, args.replicas, args.flush, args.reuse_port))


if __name__ == "__main__":
    main()
