"""Tier 2 tests of the demo programs: our server and client over real sockets, and
wire compatibility with classroom-style Java programs (``tests/integration/java``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from replicaproxy.demo.client import ConnectDeadlineError, run_example_client
from replicaproxy.demo.protocol import (
    EXPECTED_LINES,
    FIRST_MESSAGE,
    REPLY,
    SECOND_MESSAGE,
    ProtocolError,
)
from replicaproxy.demo.server import serve_example
from support import require_binary

HOST = "127.0.0.1"
# Generous bounds for every wait: a JVM starts in ~0.5 s, but CI machines can be slow.
TIMEOUT = 30.0
JAVA_SOURCES = Path(__file__).parent / "java"


class RunningServer:
    """A ``serve_example`` task on an ephemeral port and what it printed."""

    def __init__(self, task: asyncio.Task[None], port: int, lines: list[str]) -> None:
        self.task = task
        self.port = port
        self.lines = lines

    async def finished(self) -> None:
        """Wait (bounded) for a ``once`` server to serve its client and return."""
        await asyncio.wait_for(self.task, TIMEOUT)


@contextlib.asynccontextmanager
async def running_server(*, once: bool = False) -> AsyncIterator[RunningServer]:
    """Start our server on 127.0.0.1:0, wait for its ready callback, cancel it on exit."""
    lines: list[str] = []
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_example(
            HOST, 0, out=lines.append, ready=lambda _host, port: bound.set_result(port), once=once
        )
    )
    try:
        either: set[asyncio.Future[Any]] = {bound, task}
        await asyncio.wait(either, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises the bind error, if any
        yield RunningServer(task, bound.result(), lines)
    finally:
        bound.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def refusing_port() -> Iterator[socket.socket]:
    """A bound but not listening socket: connects to its port are refused, and no one
    else can take the port meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, 0))
        yield sock
    finally:
        sock.close()


def free_port() -> int:
    """A port that was free a moment ago (for programs that only take a port number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Read until the server closes; a reset counts as the end too."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(4096), TIMEOUT):
            data += chunk
    return data


def peer_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "replicaproxy.demo.server" and r.levelno == logging.WARNING
    ]


# --- our server and our client ---------------------------------------------------


async def test_client_and_server_exchange() -> None:
    replies: list[str] = []
    async with running_server(once=True) as server:
        reply = await asyncio.wait_for(
            run_example_client(HOST, server.port, out=replies.append), TIMEOUT
        )
        await server.finished()
    assert reply == "HOLA"
    assert replies == ["HOLA"]
    assert tuple(server.lines) == EXPECTED_LINES


async def test_server_logs_its_real_port(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="replicaproxy.demo")
    async with running_server() as server:
        assert f"example server listening on {HOST}:{server.port}" in caplog.messages


async def test_concurrent_clients_print_every_value() -> None:
    clients = 5
    lines: list[str] = []
    all_printed = asyncio.Event()

    def out(line: str) -> None:
        lines.append(line)
        if len(lines) == clients * len(EXPECTED_LINES):
            all_printed.set()

    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_example(HOST, 0, out=out, ready=lambda _h, port: bound.set_result(port))
    )
    try:
        port = await asyncio.wait_for(bound, TIMEOUT)
        replies = await asyncio.wait_for(
            asyncio.gather(
                *(run_example_client(HOST, port, out=lambda _s: None) for _ in range(clients))
            ),
            TIMEOUT,
        )
        await asyncio.wait_for(all_printed.wait(), TIMEOUT)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert replies == ["HOLA"] * clients
    assert Counter(lines) == Counter({line: clients for line in EXPECTED_LINES})


async def test_client_closing_early_is_one_warning_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="replicaproxy.demo")
    async with running_server() as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(FIRST_MESSAGE[:10])
            writer.write_eof()
            assert await read_to_end(reader) == b""  # closed by the server after logging
        finally:
            writer.close()
        [warning] = peer_warnings(caplog)
        local_port = writer.get_extra_info("sockname")[1]
        assert warning.getMessage() == (
            f"{HOST}:{local_port}: connection closed after 10 of 56 bytes, "
            "in the float64 of the first message"
        )
        assert warning.exc_info is None
        assert server.lines == ["123"]
        # The server still serves others.
        assert await asyncio.wait_for(
            run_example_client(HOST, server.port, out=lambda _s: None), TIMEOUT
        )


async def test_trailing_garbage_is_one_warning_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="replicaproxy.demo")
    async with running_server() as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(FIRST_MESSAGE + SECOND_MESSAGE + b"junk")
            writer.write_eof()
            assert await read_to_end(reader) == REPLY
        finally:
            writer.close()
        [warning] = peer_warnings(caplog)
        assert "4 unexpected byte(s) after the last value" in warning.getMessage()
        assert warning.getMessage().startswith(f"{HOST}:")
        assert warning.exc_info is None
        assert tuple(server.lines) == EXPECTED_LINES  # values before the garbage are printed
        assert (
            await asyncio.wait_for(
                run_example_client(HOST, server.port, out=lambda _s: None), TIMEOUT
            )
            == "HOLA"
        )


async def test_client_gives_up_after_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    with refusing_port() as sock:
        port = sock.getsockname()[1]
        started = loop.time()
        with pytest.raises(ConnectDeadlineError, match=rf"^could not connect to {HOST}:{port} "):
            await run_example_client(HOST, port, retry_interval=0.05, connect_deadline=0.3)
        elapsed = loop.time() - started
        with pytest.raises(ConnectionError, match=r" within 0\.3 s: ") as info:
            await run_example_client(HOST, port, retry_interval=0.05, connect_deadline=0.3)
    assert 0.3 <= elapsed < TIMEOUT
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


async def test_client_retries_until_the_server_listens(caplog: pytest.LogCaptureFixture) -> None:
    """The client's first connects are refused; once the port listens, it gets through."""
    caplog.set_level(logging.DEBUG, logger="replicaproxy.demo.client")
    loop = asyncio.get_running_loop()
    refused = asyncio.Event()

    class RetrySignal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying" in record.getMessage():
                loop.call_soon_threadsafe(refused.set)

    handler = RetrySignal()
    client_logger = logging.getLogger("replicaproxy.demo.client")
    client_logger.addHandler(handler)
    replies: list[str] = []
    with refusing_port() as sock:
        port = sock.getsockname()[1]
        client = asyncio.create_task(
            run_example_client(HOST, port, out=replies.append, connect_deadline=TIMEOUT)
        )
        try:
            await asyncio.wait_for(refused.wait(), TIMEOUT)  # at least one refused attempt
            sock.listen()
            sock.setblocking(False)
            conn, _ = await asyncio.wait_for(loop.sock_accept(sock), TIMEOUT)
            with conn:
                received = b""
                while len(received) < len(FIRST_MESSAGE):
                    received += await asyncio.wait_for(loop.sock_recv(conn, 4096), TIMEOUT)
                await loop.sock_sendall(conn, REPLY)
                while chunk := await asyncio.wait_for(loop.sock_recv(conn, 4096), TIMEOUT):
                    received += chunk
            assert await asyncio.wait_for(client, TIMEOUT) == "HOLA"
        finally:
            client_logger.removeHandler(handler)
            client.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await client
    assert received == FIRST_MESSAGE + SECOND_MESSAGE
    assert replies == ["HOLA"]


async def test_client_reports_a_short_reply() -> None:
    async def short_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(FIRST_MESSAGE))
        writer.write(b"HO")
        writer.close()

    server = await asyncio.start_server(short_reply, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ProtocolError, match=r"closed the connection after 2 of 4 reply bytes"):
            await asyncio.wait_for(run_example_client(HOST, port), TIMEOUT)
    finally:
        server.close()
        await server.wait_closed()


# --- compatibility with the classroom Java programs --------------------------------


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compile Server.java and Client.java; skip when there is no JDK."""
    javac = require_binary("javac")
    require_binary("java")
    out_dir = tmp_path_factory.mktemp("java-classes")
    sources = [str(JAVA_SOURCES / "Server.java"), str(JAVA_SOURCES / "Client.java")]
    subprocess.run(
        [javac, "-d", str(out_dir), *sources], check=True, timeout=120, capture_output=True
    )
    return out_dir


async def start_java(classes: Path, *args: str) -> asyncio.subprocess.Process:
    java = shutil.which("java")
    assert java is not None
    return await asyncio.create_subprocess_exec(
        java,
        # Faster JVM start-up; these programs run for a fraction of a second.
        "-XX:TieredStopAtLevel=1",
        "-XX:+UseSerialGC",
        "-cp",
        str(classes),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    """Wait (bounded) for a process to exit; return its stdout and stderr."""
    stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, stderr.decode()
    return stdout.decode(), stderr.decode()


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_java_client_against_our_server(java_classes: Path) -> None:
    async with running_server(once=True) as server:
        proc = await start_java(java_classes, "Client", HOST, str(server.port))
        try:
            stdout, _ = await finish(proc)
        finally:
            await kill(proc)
        await server.finished()
    assert stdout == "HOLA\n"
    assert tuple(server.lines) == EXPECTED_LINES


async def test_our_client_against_java_server(java_classes: Path) -> None:
    port = free_port()
    proc = await start_java(java_classes, "Server", str(port))
    try:
        # The JVM takes a moment to listen: our client's connect retry is the readiness wait.
        replies: list[str] = []
        reply = await run_example_client(HOST, port, out=replies.append, connect_deadline=TIMEOUT)
        stdout, _ = await finish(proc)
    finally:
        await kill(proc)
    assert reply == "HOLA"
    assert replies == ["HOLA"]
    # Real Java's println output equals ours line for line (java_double_str included).
    assert stdout.splitlines() == list(EXPECTED_LINES)
