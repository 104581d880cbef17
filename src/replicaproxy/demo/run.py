"""``replicaproxy demo``: the whole idea in one command, on loopback.

Two example servers run as separate processes (a primary and a replica), the
proxy runs in this process in front of them, and the example client talks to
the proxy. The demo prints, side by side, what each server received and what
the client got, and exits 0 only if the replica saw exactly what the primary
saw and the client got ``HOLA``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from replicaproxy.config import Overrides, build_config
from replicaproxy.demo.client import run_example_client
from replicaproxy.demo.protocol import EXPECTED_LINES, REPLY
from replicaproxy.server import Server

#: Bound on every wait in the demo; the whole exchange takes milliseconds.
STEP_TIMEOUT = 15.0
_LISTENING = re.compile(r"listening on (?:\[(?P<v6>[^\]]+)\]|(?P<host>[^\s:]+)):(?P<port>\d+)")


@dataclass
class ExampleServer:
    """An example server in its own process, and the values it printed."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    lines: list[str] = field(default_factory=list)

    async def read_values(self, count: int) -> list[str]:
        """Wait for ``count`` more printed values (bounded by STEP_TIMEOUT)."""
        assert self.proc.stdout is not None
        got: list[str] = []
        async with asyncio.timeout(STEP_TIMEOUT):
            while len(got) < count:
                raw = await self.proc.stdout.readline()
                if not raw:
                    break
                got.append(raw.decode().rstrip("\n"))
        self.lines += got
        return got


async def start_example_server(name: str) -> ExampleServer:
    """Start ``replicaproxy example-server --port 0`` and read its port from its log."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "replicaproxy",
        "example-server",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                raw = await proc.stderr.readline()
                if not raw:
                    raise RuntimeError(f"example server {name} exited before listening")
                m = _LISTENING.search(raw.decode())
                if m:
                    break
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    # Keep draining its log so the pipe never fills up and blocks it.
    asyncio.get_running_loop().create_task(_drain(proc.stderr))
    return ExampleServer(name, proc, int(m["port"]))


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


@contextlib.asynccontextmanager
async def example_servers(*names: str) -> AsyncIterator[list[ExampleServer]]:
    """Run one example server per name; kill them all on the way out."""
    servers: list[ExampleServer] = []
    try:
        for name in names:
            servers.append(await start_example_server(name))
        yield servers
    finally:
        for s in servers:
            if s.proc.returncode is None:
                s.proc.kill()
            await s.proc.wait()


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        s.rstrip() for s in [fmt.format(*header), line, *(fmt.format(*r) for r in rows)]
    )


async def run_demo() -> int:
    """Run the demo; return the process exit code (0: everything held)."""
    with tempfile.TemporaryDirectory(prefix="replicaproxy-demo-") as tmp:
        async with example_servers("primary", "replica") as (primary, replica):
            config = build_config(
                None,
                Overrides(
                    listen="127.0.0.1:0",
                    primary=f"127.0.0.1:{primary.port}",
                    replicas=(f"127.0.0.1:{replica.port}",),
                    state_file=str(Path(tmp) / "state.json"),
                ),
            )
            server = Server(config)
            serving = asyncio.get_running_loop().create_task(server.serve(handle_signals=False))
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await server.started.wait()
                assert server.bound is not None
                print(f"primary example server on 127.0.0.1:{primary.port}")
                print(f"replica example server on 127.0.0.1:{replica.port}")
                print(f"replicaproxy listening on {server.bound}")
                print()
                got: list[str] = []
                reply = await run_example_client(
                    "127.0.0.1", server.bound.port, out=got.append, connect_deadline=STEP_TIMEOUT
                )
                n = len(EXPECTED_LINES)
                p_lines, r_lines = await asyncio.gather(
                    primary.read_values(n), replica.read_values(n)
                )
            finally:
                server.request_shutdown()
                await serving
    rows: list[tuple[str, ...]] = []
    for i in range(max(len(p_lines), len(r_lines))):
        p = p_lines[i] if i < len(p_lines) else "(nothing)"
        r = r_lines[i] if i < len(r_lines) else "(nothing)"
        rows.append((p, r, "yes" if p == r else "NO"))
    print("What each server received through the proxy:")
    print(_table(rows, ("primary", "replica", "same")))
    print()
    print(f"The client got: {reply}")
    ok = p_lines == r_lines == list(EXPECTED_LINES) and reply == REPLY.decode()
    print()
    if ok:
        print("demo: ok: the replica received exactly what the primary received,")
        print("      and the client got the primary's HOLA.")
        return 0
    print("demo: FAILED: see the table above")
    return 1
