"""``replicaproxy demo --cluster``: two proxies sharing one view in etcd, on loopback.

Act 1: a client through proxy A; both example servers get every byte. Act 2: the
primary is killed; A fails over, and B adopts the new view from etcd without being
told. Act 3: B is cut off from etcd (its connection to etcd goes through a relay here
that stops passing bytes, as a partition would): B stops serving within store_ttl
while A carries on; once the relay passes bytes again B serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from replicaproxy.config import Config, config_from_dict
from replicaproxy.demo.client import run_example_client
from replicaproxy.demo.run import STEP_TIMEOUT, example_servers
from replicaproxy.server import Server

#: The demo's lease: short, so that the fencing act takes seconds (the default is 5 s).
DEMO_TTL = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def etcd(binary: str, data: Path) -> AsyncIterator[int]:
    """One etcd member on loopback; yields its client port once it serves."""
    client, peer = _free_port(), _free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, "--name", "demo", "--data-dir", str(data / "etcd"),
        "--listen-client-urls", f"http://127.0.0.1:{client}",
        "--advertise-client-urls", f"http://127.0.0.1:{client}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"demo=http://127.0.0.1:{peer}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(STEP_TIMEOUT):
            while b"ready to serve client requests" not in await proc.stderr.readline():
                if proc.returncode is not None:
                    raise RuntimeError("etcd did not start")
        drain = asyncio.get_running_loop().create_task(_drain(proc.stderr))
        yield client
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


class Relay:
    """A TCP relay to etcd that can stop passing bytes (a partition, without a namespace)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.open.wait()  # cut: bytes wait here, as if lost
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _config(name: str, url: str, mv1: int, mv2: int) -> Config:
    return config_from_dict(
        {
            "proxy": {
                "listen": "127.0.0.1:0",
                "view_store": url,
                "name": name,
                "store_ttl": DEMO_TTL,
            },
            "health": {"interval": 0.3, "fall": 2},
            "backend": [
                {"name": "mv1", "address": f"127.0.0.1:{mv1}", "role": "primary"},
                {"name": "mv2", "address": f"127.0.0.1:{mv2}", "role": "replica"},
            ],
        },
        source="demo",
    )


async def _until(what: str, check: object, limit: float = STEP_TIMEOUT) -> None:
    """Wait (bounded) until ``check()`` is true: the proxies act in their own tasks."""
    assert callable(check)
    async with asyncio.timeout(limit):
        for _ in iter(check, True):
            await asyncio.sleep(0.05)


async def _client(port: int) -> str:
    return await run_example_client("127.0.0.1", port, out=lambda _: None, connect_deadline=2.0)


def _show(label: str, server: Server) -> None:
    s = server.status()
    store = s["store"]
    states = ", ".join(f"{b['name']} {b['role']} {b['state']}" for b in s["backends"])
    print(f"  {label}: epoch {s['epoch']}, {states}; store {'up' if store['up'] else 'DOWN'}"
          f"{', not serving' if store['fenced'] else ''}")  # fmt: skip


async def run_cluster_demo() -> int:
    """Run the cluster demo; the exit code (0: everything held, 1: failed or no etcd)."""
    binary = shutil.which("etcd")
    if binary is None:
        print("demo --cluster needs etcd (Debian: apt-get install etcd-server)")
        return 1
    ok = True
    with tempfile.TemporaryDirectory(prefix="replicaproxy-demo-") as tmp:
        async with etcd(binary, Path(tmp)) as port, example_servers("mv1", "mv2") as (mv1, mv2):
            relay = Relay(port)
            via = await relay.start()
            a = Server(_config("proxy-a", f"etcd://127.0.0.1:{port}/demo", mv1.port, mv2.port))
            b = Server(_config("proxy-b", f"etcd://127.0.0.1:{via}/demo", mv1.port, mv2.port))
            tasks = [asyncio.get_running_loop().create_task(s.serve(handle_signals=False))
                     for s in (a, b)]  # fmt: skip
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await a.started.wait()
                    await b.started.wait()
                assert a.bound is not None and b.bound is not None
                print("Act 1: two proxies share one view in etcd; a client goes through A.")
                print(f"  etcd on 127.0.0.1:{port}; A on {a.bound}; B on {b.bound} "
                      "(B reaches etcd through a relay)")  # fmt: skip
                print(f"  the client got {await _client(a.bound.port)}")
                _show("A", a)
                _show("B", b)
                print("\nAct 2: mv1 is killed; a client through A fails over to mv2.")
                mv1.proc.send_signal(signal.SIGKILL)
                await mv1.proc.wait()
                print(f"  the client got {await _client(a.bound.port)}")
                await _until("B adopts epoch 1", lambda: b.view.epoch == 1)
                print("  B adopted the new view from etcd (nobody told it):")
                _show("A", a)
                _show("B", b)
                ok &= a.view.primary == b.view.primary == "mv2"
                print(f"\nAct 3: B is cut off from etcd; within store_ttl ({DEMO_TTL:g} s) it"
                      " stops serving, A carries on.")  # fmt: skip
                relay.open.clear()
                await _until("B fenced", lambda: b.status()["store"]["fenced"], DEMO_TTL + 5)
                _show("A", a)
                _show("B", b)
                refused = False
                try:
                    await _client(b.bound.port)
                except (OSError, EOFError, asyncio.IncompleteReadError):
                    refused = True
                print(f"  a client through B: {'refused' if refused else 'SERVED (wrong)'}")
                print(f"  a client through A got {await _client(a.bound.port)}")
                ok &= refused
                relay.open.set()
                await _until("B serves again", lambda: not b.status()["store"]["fenced"]
                             and b.status()["store"]["up"], DEMO_TTL + 10)  # fmt: skip
                print("  etcd reachable again: B registered anew and serves again")
                _show("B", b)
            finally:
                for s in (a, b):
                    s.request_shutdown()
                await asyncio.gather(*tasks, return_exceptions=True)
                relay.close()
    print()
    if ok:
        print("demo --cluster: ok: both proxies saw one failover, and the one cut off from")
        print("                etcd stopped serving until it could read the view again.")
        return 0
    print("demo --cluster: FAILED: see above")
    return 1
