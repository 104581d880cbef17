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
import io
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from replicaproxy.config import config_from_dict
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


def _side_by_side(p_lines: list[str], r_lines: list[str]) -> str:
    rows: list[tuple[str, ...]] = []
    for i in range(max(len(p_lines), len(r_lines))):
        p = p_lines[i] if i < len(p_lines) else "(nothing)"
        r = r_lines[i] if i < len(r_lines) else "(nothing)"
        rows.append((p, r, "yes" if p == r else "NO"))
    return _table(rows, ("mv1 (primary)", "mv2 (replica)", "same"))


async def run_demo() -> int:
    """Run the demo; return the process exit code (0: everything held)."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # keep in step with the log on stderr
    expected = list(EXPECTED_LINES)
    n = len(expected)
    with tempfile.TemporaryDirectory(prefix="replicaproxy-demo-") as tmp:
        async with example_servers("mv1", "mv2") as (mv1, mv2):
            config = config_from_dict(
                {
                    "proxy": {"listen": "127.0.0.1:0", "state_file": str(Path(tmp) / "state.json")},
                    "backend": [
                        {"name": "mv1", "address": f"127.0.0.1:{mv1.port}", "role": "primary"},
                        {"name": "mv2", "address": f"127.0.0.1:{mv2.port}", "role": "replica"},
                    ],
                },
                source="demo",
            )
            server = Server(config)
            serving = asyncio.get_running_loop().create_task(server.serve(handle_signals=False))
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await server.started.wait()
                assert server.bound is not None
                port = server.bound.port
                print("Act 1: the client talks to the proxy; both servers get every byte.")
                print(f"  mv1, the primary: example server on 127.0.0.1:{mv1.port}")
                print(f"  mv2, a replica:   example server on 127.0.0.1:{mv2.port}")
                print(f"  replicaproxy listening on {server.bound}")
                print()
                reply1 = await run_example_client(
                    "127.0.0.1", port, out=lambda _: None, connect_deadline=STEP_TIMEOUT
                )
                p_lines, r_lines = await asyncio.gather(mv1.read_values(n), mv2.read_values(n))
                print(_side_by_side(p_lines, r_lines))
                print()
                print(f"The client got: {reply1}")
                act1 = p_lines == r_lines == expected and reply1 == REPLY.decode()
                print()
                print("Act 2: mv1 is killed (SIGKILL); the client runs again.")
                mv1.proc.send_signal(signal.SIGKILL)
                await mv1.proc.wait()
                reply2 = await run_example_client(
                    "127.0.0.1", port, out=lambda _: None, connect_deadline=STEP_TIMEOUT
                )
                r_lines2 = await mv2.read_values(n)
                print(_table([(line,) for line in r_lines2], ("mv2 (now the primary)",)))
                print()
                print(f"The client got: {reply2} (answered by mv2)")
                view = server.status()
                print()
                print(f"The view: epoch {view['epoch']}, primary {view['primary']}")
                for b in view["backends"]:
                    print(f"  {b['name']}: {b['role']}, {b['state']}")
                act2 = (
                    r_lines2 == expected
                    and reply2 == REPLY.decode()
                    and view["primary"] == "mv2"
                    and view["epoch"] == 1
                )
            finally:
                server.request_shutdown()
                await serving
    print()
    if act1 and act2:
        print("demo: ok: mv2 received exactly what mv1 received, the client got HOLA,")
        print("      and when mv1 died mv2 took over with everything it had seen.")
        return 0
    print("demo: FAILED: see above")
    return 1
