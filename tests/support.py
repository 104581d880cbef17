"""Helpers for tier 2 tests: real processes on loopback, waited on by their output.

Every wait is bounded in time; every process is killed by its context manager.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
#: The bound on any single wait for a process to say something.
WAIT = 20.0
SINK = Path(__file__).parent / "integration" / "sink.py"


def require_binary(name: str) -> str:
    """Path of program ``name``; skip the test without it (fail in CI, where it must be)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (CI installs it: see .ci/run)"
        if os.environ.get("REPLICAPROXY_REQUIRE_ALL"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


class Proc:
    """A child process whose stdout and stderr lines are collected as they come."""

    def __init__(
        self,
        args: list[str],
        *,
        name: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.popen = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.lines: list[str] = []  # stdout and stderr, in arrival order
        self.stdout: list[str] = []
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, False), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream: object, is_stdout: bool) -> None:
        assert stream is not None
        for raw in stream:  # type: ignore[attr-defined]
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                if is_stdout:
                    self.stdout.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, pattern: str, timeout: float = WAIT, *, start: int = 0) -> re.Match[str]:
        """Wait until a line (from index ``start`` on) matches ``pattern``; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._alive_readers()):
                    break
                self._cond.wait(min(left, 0.5))
        tail = "\n".join(self.lines[-30:])
        raise AssertionError(
            f"{self.name}: no line matching {pattern!r} within {timeout} s "
            f"(exit code {self.popen.poll()}); last lines:\n{tail}"
        )

    def wait_stdout_lines(self, count: int, timeout: float = WAIT) -> list[str]:
        """Wait until stdout has at least ``count`` lines; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.stdout) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._alive_readers()):
                    raise AssertionError(
                        f"{self.name}: {len(self.stdout)} of {count} stdout lines; "
                        f"last lines:\n" + "\n".join(self.lines[-30:])
                    )
                self._cond.wait(min(left, 0.5))
            return list(self.stdout)

    def wait_count(self, pattern: str, n: int, timeout: float = WAIT) -> None:
        """Wait until ``n`` lines match ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for line in self.lines if rx.search(line)) < n:
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._alive_readers()):
                    raise AssertionError(
                        f"{self.name}: fewer than {n} lines matching {pattern!r}; last lines:\n"
                        + "\n".join(self.lines[-30:])
                    )
                self._cond.wait(min(left, 0.5))

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if rx.search(line))

    def _alive_readers(self) -> bool:
        return any(t.is_alive() for t in self._readers)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = WAIT) -> int:
        return self.popen.wait(timeout)

    def rss_kib(self) -> int:
        """Resident memory of the process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(WAIT)
        for t in self._readers:
            t.join(WAIT)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def running(args: list[str], *, name: str, cwd: Path | None = None) -> Iterator[Proc]:
    proc = Proc(args, name=name, cwd=cwd)
    try:
        yield proc
    finally:
        proc.stop()


class LoopbackServer:
    """A TCP server of a test's own on a free loopback port: ``serve(conn)`` is called
    for each connection, on the accept loop's thread, or on one of its own with
    ``threaded``; it closes ``conn`` when done. ``close()`` stops accepting."""

    def __init__(self, serve: Callable[[socket.socket], None], *, threaded: bool = False) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self._handle = serve
        self._threaded = threaded
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._threaded:
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
            else:
                self._handle(conn)

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    """A port nobody listens on right now (for servers that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def replicaproxy(*args: str) -> list[str]:
    return [sys.executable, "-m", "replicaproxy", *args]


@contextlib.contextmanager
def proxy(*args: str, name: str = "proxy") -> Iterator[tuple[Proc, int]]:
    """``replicaproxy run ARGS`` listening on a free loopback port; yields it and the port.

    Each proxy gets a state file of its own unless ARGS name one (or a config does).
    """
    state: list[str] = []
    if "--state-file" not in args and "--config" not in args:
        state = ["--state-file", str(Path(tempfile.mkdtemp(prefix="rp-state-")) / "state.json")]
    with running(replicaproxy("run", "--listen", f"{HOST}:0", *state, *args), name=name) as p:
        m = p.wait_for(r"listening on [\d.]+:(\d+)")
        yield p, int(m[1])


@contextlib.contextmanager
def example_server(name: str) -> Iterator[tuple[Proc, int]]:
    with running(replicaproxy("example-server", "--port", "0"), name=name) as p:
        m = p.wait_for(r"listening on [\d.]+:(\d+)")
        yield p, int(m[1])


@contextlib.contextmanager
def sink(name: str, *, echo: bool = False, port: int = 0) -> Iterator[tuple[Proc, int]]:
    """A server that counts and hashes what each connection sends (see sink.py)."""
    args = [sys.executable, str(SINK), "--port", str(port), *(["--echo"] if echo else [])]
    with running(args, name=name) as p:
        m = p.wait_for(r"listening on [\d.]+:(\d+)")
        yield p, int(m[1])


@contextlib.contextmanager
def redis(tmp: Path, name: str = "redis") -> Iterator[tuple[Proc, int]]:
    """A throwaway redis-server on a free port, no persistence, DEBUG allowed locally."""
    with _redis(tmp, name, lambda: []) as (p, port, _):
        yield p, port


@contextlib.contextmanager
def redis_tls(
    tmp: Path, name: str, cert: Path, key: Path, ca: Path, *, auth_clients: bool = False
) -> Iterator[tuple[Proc, int, int]]:
    """``redis()`` that also speaks TLS, presenting ``cert``; yields it, its plain port (for
    ``digest``) and its TLS port. With ``auth_clients`` its clients need a certificate
    signed by ``ca``."""
    tls_port = [0]

    def args() -> list[str]:
        tls_port[0] = free_port()
        return [
            "--tls-port", str(tls_port[0]), "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "yes" if auth_clients else "no",
        ]  # fmt: skip

    with _redis(tmp, name, args) as (p, port, _):
        yield p, port, tls_port[0]


@contextlib.contextmanager
def _redis(
    tmp: Path, name: str, extra: Callable[[], list[str]]
) -> Iterator[tuple[Proc, int, None]]:
    binary = require_binary("redis-server")
    for _attempt in range(5):
        port = free_port()
        with running(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp),
                "--logfile",
                "",
                "--enable-debug-command",
                "local",
                *extra(),
            ],
            name=f"{name}:{port}",
        ) as p:
            m = p.wait_for(r"Ready to accept connections|Address already in use|Could not create")
            if "Ready" in m[0]:
                yield p, port, None
                return
    raise AssertionError("could not start redis-server on a free port")


# ------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pair:
    """A certificate (PEM) and its key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    """Certificates made for one test (EC P-256, valid one day, for 127.0.0.1 and localhost).

    ``ca`` signed ``server`` and ``client``; ``other_ca``, which nothing trusts unless a
    test says so, signed ``other``.
    """

    ca: Path
    server: Pair
    client: Pair
    other_ca: Path
    other_ca_key: Path
    other: Pair


def _openssl(*args: str) -> None:
    out = subprocess.run(
        [require_binary("openssl"), *args], capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr.strip()}"


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA in ``folder``: its certificate and key."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", *_EC, "-keyout", str(key), "-out", str(cert),
             "-subj", f"/CN={name}", "-days", "1")  # fmt: skip
    return cert, key


def make_pair(folder: Path, name: str, ca: tuple[Path, Path]) -> Pair:
    """A certificate for 127.0.0.1 and localhost, signed by ``ca``, and its key."""
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", *_EC, "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(pair.cert), "-days", "1",
             "-extfile", str(ext))  # fmt: skip
    return pair


def make_certs(folder: Path) -> Certs:
    """A CA with a server and a client certificate, and another CA with one of its own.

    Skipped (failed in CI) without the openssl program.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca(folder, "ca")
    other_ca = make_ca(folder, "other-ca")
    return Certs(
        ca=ca[0],
        server=make_pair(folder, "server", ca),
        client=make_pair(folder, "client", ca),
        other_ca=other_ca[0],
        other_ca_key=other_ca[1],
        other=make_pair(folder, "other", other_ca),
    )


def redis_cli(port: int, *cmd: str) -> str:
    binary = require_binary("redis-cli")
    out = subprocess.run(
        [binary, "-h", HOST, "-p", str(port), *cmd],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    return out.stdout.strip()


def digest(port: int) -> str:
    """Redis ``DEBUG DIGEST``: one hash of the whole data set (40 hex digits)."""
    value = redis_cli(port, "DEBUG", "DIGEST")
    assert re.fullmatch(r"[0-9a-f]{40}", value), f"not a digest: {value!r}"
    return value


def connect(port: int, timeout: float = WAIT) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout)
    return s


def recv_all(s: socket.socket, timeout: float = WAIT) -> bytes:
    """Read until EOF (bounded by ``timeout`` per read)."""
    s.settimeout(timeout)
    chunks: list[bytes] = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def config_text(
    tmp_path: Path,
    backends: Sequence[tuple[str, int | str, str] | tuple[str, int | str, str, str]],
    *,
    extra: str = "",
    health: str = "",
    admin: str = "",
) -> str:
    """A config with the admin API on a free port and a state file in ``tmp_path``.

    A backend is ``(NAME, ADDRESS, ROLE)`` or ``(NAME, ADDRESS, ROLE, MORE)`` with lines
    for its table; its address is a port on 127.0.0.1, or a full ``HOST:PORT``. ``extra``
    goes in [proxy], ``admin`` in [admin].
    """
    lines = [
        "[proxy]",
        'listen = "127.0.0.1:0"',
        f'state_file = "{tmp_path / "state.json"}"',
        extra,
        "[admin]",
        'listen = "127.0.0.1:0"',
        admin,
        "[health]",
        health or "interval = 0.2\ntimeout = 0.5\nfall = 2\nrise = 2",
    ]
    for name, where, role, *more in backends:
        address = f"{HOST}:{where}" if isinstance(where, int) else where
        lines += [
            "[[backend]]",
            f'name = "{name}"',
            f'address = "{address}"',
            f'role = "{role}"',
            *more,
        ]
    path = tmp_path / "replicaproxy.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Proxy:
    """A running ``replicaproxy run --config``, its client port and its admin address
    (HTTPS trusting ``cacert`` when it is given)."""

    def __init__(self, proc: Proc, port: int, admin: str, cacert: Path | None = None) -> None:
        self.proc = proc
        self.port = port
        self.admin = admin
        self.cacert = cacert

    def ctl(self, *args: str, token: str = "") -> subprocess.CompletedProcess[str]:
        extra = ["--token", token] if token else []
        if self.cacert is not None:
            extra += ["--cacert", str(self.cacert)]
        return subprocess.run(
            replicaproxy("ctl", "--admin", self.admin, *extra, *args),
            capture_output=True,
            text=True,
            timeout=WAIT,
        )

    def status(self) -> dict[str, Any]:
        out = self.ctl("status", "--json")
        assert out.returncode == 0, out.stderr
        status: dict[str, Any] = json.loads(out.stdout)
        return status

    def states(self) -> dict[str, str]:
        return {b["name"]: b["state"] for b in self.status()["backends"]}


@contextlib.contextmanager
def run_proxy(
    config: str, *extra: str, name: str = "proxy", cacert: Path | None = None
) -> Iterator[Proxy]:
    """``replicaproxy run --config``; with ``cacert``, its admin API speaks HTTPS."""
    scheme = "https" if cacert is not None else "http"
    with running(replicaproxy("run", "--config", config, *extra), name=name) as p:
        admin = p.wait_for(rf"admin API on {scheme}://([\d.]+:\d+)")[1]
        port = int(p.wait_for(r"listening on [\d.]+:(\d+)")[1])
        yield Proxy(p, port, admin, cacert)


def example_client(port: int) -> str:
    out = subprocess.run(
        replicaproxy("example-client", HOST, str(port)),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def refused(port: int, timeout: float = 5.0) -> bool:
    """Whether the proxy closes a new connection at once (a reset or an empty EOF)."""
    try:
        with connect(port, timeout=timeout) as s:
            s.sendall(b"anyone there?")
            return recv_all(s, timeout=timeout) == b""
    except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError):
        return True


# --------------------------------------------------- fault injection helpers (tests/faults)


def metric(admin: str, sample: str) -> float:
    """One sample of ``GET /metrics``, named as printed (``name{label="v"}``); 0.0 if absent."""
    import urllib.request

    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=WAIT) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``."""
    import math

    assert values, "no values"
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def assert_no_crash(proc: Proc) -> None:
    """The proxy logged no traceback and no bug caught at its dispatch boundary."""
    bad = [line for line in proc.lines if "Traceback" in line or "internal error" in line]
    assert not bad, "\n".join(bad[:20])


def _sh(*args: str) -> None:
    out = subprocess.run(args, capture_output=True, text=True, timeout=WAIT)
    if out.returncode != 0:
        raise OSError(f"{' '.join(args)}: {out.stderr.strip() or out.returncode}")


class NetNs:
    """A network namespace joined to the root one by a veth pair on a /30 of 10.200.0.0/16.

    ``host_ip`` is the root side (``host_dev``), ``ns_ip`` the namespace side (``ns_dev``).
    The addresses exist only on this pair, on this machine.
    """

    def __init__(self, name: str, host_dev: str, ns_dev: str, subnet: int) -> None:
        self.name = name
        self.host_dev = host_dev
        self.ns_dev = ns_dev
        self.host_ip = f"10.200.{subnet}.1"
        self.ns_ip = f"10.200.{subnet}.2"

    def exec(self, *args: str) -> list[str]:
        """A command line that runs ``args`` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str) -> None:
        """Run ``args`` inside the namespace; OSError if it fails."""
        _sh(*self.exec(*args))

    def link(self, up: bool) -> None:
        """Partition (False) or heal (True): the namespace side of the pair down or up."""
        self.run("ip", "link", "set", self.ns_dev, "up" if up else "down")


_netns_ids = iter(range(1 << 30))


@contextlib.contextmanager
def netns(tag: str) -> Iterator[NetNs]:
    """A fresh namespace and veth pair, deleted afterwards; skipped (failed in CI) if impossible."""
    require_binary("ip")
    n = next(_netns_ids)
    name = f"rp-{tag}-{os.getpid()}-{n}"
    dev = f"rp{os.getpid() % 100000}x{n}"
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    subnets = [s for s in range(256) if f"10.200.{s}." not in used]
    subnet = subnets[(os.getpid() + n) % len(subnets)]
    ns = NetNs(name, f"{dev}a", f"{dev}b", subnet)
    try:
        _sh("ip", "netns", "add", name)
    except OSError as exc:
        reason = f"cannot create a network namespace (needs root): {exc}"
        if os.environ.get("REPLICAPROXY_REQUIRE_ALL"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        _sh("ip", "link", "add", ns.host_dev, "type", "veth", "peer", "name", ns.ns_dev)
        _sh("ip", "link", "set", ns.ns_dev, "netns", name)
        _sh("ip", "addr", "add", f"{ns.host_ip}/30", "dev", ns.host_dev)
        _sh("ip", "link", "set", ns.host_dev, "up")
        ns.run("ip", "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_dev)
        ns.run("ip", "link", "set", ns.ns_dev, "up")
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        # Deleting the namespace deletes its end of the pair, and so the pair.
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=WAIT)
        subprocess.run(["ip", "link", "del", ns.host_dev], capture_output=True, timeout=WAIT)


def log_time(line: str) -> float:
    """The wall-clock time (``time.time()`` scale) of a proxy log line in the text format."""
    import datetime

    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def echo_round_trip(s: socket.socket, data: bytes, timeout: float = WAIT) -> None:
    """Send ``data`` through a session to an echoing sink and read it back.

    Once it is back, the proxy has certainly accepted the session.
    """
    s.sendall(data)
    s.settimeout(timeout)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(len(data) - len(got))
        assert chunk, f"closed after {len(got)} of {len(data)} echoed bytes"
        got += chunk
    assert got == data


# ------------------------------------------------------------------ etcd (tests/faults)


class Etcd:
    """A running etcd cluster on loopback: its processes and client endpoints."""

    def __init__(self, procs: list[Proc], endpoints: list[str], data: Path) -> None:
        self.procs = procs
        self.endpoints = endpoints
        self.data = data

    def url(self, prefix: str, endpoints: Sequence[str] | None = None) -> str:
        """``etcd://E1,E2,E3/PREFIX`` for a view store."""
        return f"etcd://{','.join(endpoints or self.endpoints)}/{prefix}"


def _etcd_args(binary: str, name: str, data: Path, client: list[str], peer: str,
               cluster: str) -> list[str]:  # fmt: skip
    return [
        binary, "--name", name, "--data-dir", str(data / name),
        "--listen-client-urls", ",".join(f"http://{c}" for c in client),
        "--advertise-client-urls", f"http://{client[0]}",
        "--listen-peer-urls", f"http://{peer}",
        "--initial-advertise-peer-urls", f"http://{peer}",
        "--initial-cluster", cluster, "--initial-cluster-state", "new",
        "--initial-cluster-token", name.split("-", maxsplit=1)[0],
        # Snappier elections than the defaults (100 ms / 1 s) on a busy 2-core machine
        # would risk spurious ones: keep the defaults.
    ]  # fmt: skip


def start_etcd_node(binary: str, name: str, data: Path, client: list[str], peer: str,
                    cluster: str) -> Proc:  # fmt: skip
    """One etcd member; returns once it serves clients (its own log says so)."""
    p = Proc(_etcd_args(binary, name, data, client, peer, cluster), name=name)
    try:
        p.wait_for(r"ready to serve client requests|serving insecure client requests",
                   timeout=WAIT)  # fmt: skip
    except BaseException:
        p.stop()
        raise
    return p


@contextlib.contextmanager
def etcd_cluster(tmp: Path, size: int = 3, *, extra_host: str = "") -> Iterator[Etcd]:
    """``size`` etcd members on 127.0.0.1 (each also on ``extra_host`` when given).

    Skipped (failed in CI) without the etcd binary. Every member is killed afterwards.
    """
    binary = require_binary("etcd")
    tag = f"rp{os.getpid()}x{next(_netns_ids)}"
    clients = [free_port() for _ in range(size)]
    peers = [free_port() for _ in range(size)]
    names = [f"{tag}-{i}" for i in range(size)]
    cluster = ",".join(f"{n}=http://{HOST}:{p}" for n, p in zip(names, peers, strict=True))
    procs: list[Proc] = []
    try:
        # Members wait for each other before they serve: start all, then wait on each.
        for n, c, p in zip(names, clients, peers, strict=True):
            addresses = [f"{HOST}:{c}"] + ([f"{extra_host}:{c}"] if extra_host else [])
            procs.append(
                Proc(_etcd_args(binary, n, tmp, addresses, f"{HOST}:{p}", cluster), name=n)
            )
        for proc in procs:
            proc.wait_for(r"ready to serve client requests", timeout=WAIT)
        yield Etcd(procs, [f"{HOST}:{c}" for c in clients], tmp)
    finally:
        for proc in procs:
            proc.stop()


def admin_get(admin: str, path: str) -> Any:
    """``GET path`` from an admin API, as JSON."""
    import urllib.request

    with urllib.request.urlopen(f"http://{admin}{path}", timeout=WAIT) as r:
        return json.loads(r.read())


def admin_post(admin: str, path: str) -> tuple[int, Any]:
    """``POST path`` to an admin API: (HTTP status, JSON answer)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{admin}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until(what: str, check: Any, timeout: float = WAIT, every: float = 0.05) -> Any:
    """Call ``check()`` until it returns something true (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last: {value!r})")
        time.sleep(every)


# ------------------------------------------------------------------ other servers


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program (initdb, postgres): Debian keeps them off PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    return require_binary(name)


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: run it as the postgres user then."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups", "--"]


@contextlib.contextmanager
def postgres(
    name: str = "postgres", *, hba: str = "", tls: Pair | None = None
) -> Iterator[tuple[Proc, int]]:
    """A throwaway PostgreSQL server on a free loopback port, trust logins for everyone
    (``hba``: pg_hba.conf lines in place of that); with ``tls``, ``ssl = on`` with that
    certificate. Killed whole (postmaster and backends) at the end:
    ``os.killpg(proc.pid, SIGKILL)`` is what a crash looks like."""
    initdb = _postgres_bin("initdb")
    server = _postgres_bin("postgres")
    top = Path(tempfile.mkdtemp(prefix=f"rp-{name}-"))
    data = top / "data"
    if os.geteuid() == 0:
        shutil.chown(top, "postgres", "postgres")
    try:
        subprocess.run(
            [*_as_postgres(), initdb, "-D", str(data), "-A", "trust", "-U", "postgres",
             "--no-sync", "--no-instructions"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        if hba:
            (data / "pg_hba.conf").write_text(hba + "\n")
        options: list[str] = []
        if tls is not None:
            # Its key must be its own and private, or it refuses to start.
            for source, target in ((tls.cert, top / "server.pem"), (tls.key, top / "server.key")):
                shutil.copyfile(source, target)
                target.chmod(0o600)
                if os.geteuid() == 0:
                    shutil.chown(target, "postgres", "postgres")
            options = ["-c", "ssl=on", "-c", f"ssl_cert_file={top / 'server.pem'}",
                       "-c", f"ssl_key_file={top / 'server.key'}"]  # fmt: skip
        for _attempt in range(5):
            port = free_port()
            args = [*_as_postgres(), server, "-D", str(data), "-p", str(port), "-k", str(top),
                    "-c", f"listen_addresses={HOST}", "-c", "fsync=off",
                    "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                    *options]  # fmt: skip
            proc = Proc(args, name=f"{name}:{port}")
            try:
                m = proc.wait_for(r"ready to accept connections|could not bind|already in use")
                if "ready" in m[0]:
                    yield proc, port
                    return
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.stop()
        raise AssertionError("could not start postgres on a free port")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def psql(port: int, sql: str, *, user: str = "postgres", db: str = "postgres") -> str:
    """``psql -c SQL`` (tuples only, unaligned) against 127.0.0.1:PORT; its output."""
    binary = require_binary("psql")
    out = subprocess.run(
        [binary, "-h", HOST, "-p", str(port), "-U", user, "-d", db, "-XAtq", "-c", sql],
        capture_output=True, text=True, timeout=WAIT, env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )  # fmt: skip
    assert out.returncode == 0, f"psql {sql!r}: {out.stderr}"
    return out.stdout.strip()


@contextlib.contextmanager
def memcached(name: str = "memcached") -> Iterator[tuple[Proc, int]]:
    """A memcached on a free loopback port (text protocol, 64 MB)."""
    binary = require_binary("memcached")
    for _attempt in range(5):
        port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with running(
            [binary, "-l", HOST, "-p", str(port), "-U", "0", "-m", "64", "-vv", *user],
            name=f"{name}:{port}",
        ) as p:
            # (-vv: it says so once it listens; a taken port ends it)
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and p.popen.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                    yield p, port
                    return
                time.sleep(0.02)
    raise AssertionError("could not start memcached on a free port")


@contextlib.contextmanager
def nginx(
    name: str = "nginx", *, extra: str = "", clock: str = ""
) -> Iterator[tuple[Proc, int, Path]]:
    """An nginx on a free loopback port serving (and storing, by WebDAV PUT and DELETE)
    files in a directory of its own; yields it, the port and the directory. Killed
    whole (master and workers) at the end. ``clock`` (libfaketime's FAKETIME, e.g.
    "-1h") sets its clock apart: its Date header then always differs."""
    binary = _nginx_bin()
    env = None
    if clock:
        preload = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
        if not preload.exists():
            require_binary("faketime")  # (skips, or fails in CI, where it is installed)
        env = {**os.environ, "LD_PRELOAD": str(preload), "FAKETIME": clock}
    top = Path(tempfile.mkdtemp(prefix=f"rp-{name}-"))
    root = top / "files"
    root.mkdir()
    (top / "body").mkdir()
    if os.geteuid() == 0:  # (its workers run as nobody: they write here)
        top.chmod(0o755)
        shutil.chown(root, "nobody")
        shutil.chown(top / "body", "nobody")
    try:
        for _attempt in range(5):
            port = free_port()
            conf = top / "nginx.conf"
            user = "user nobody nogroup;" if os.geteuid() == 0 else ""
            conf.write_text(
                f"""{user}
daemon off; master_process on; worker_processes 1; pid {top}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {top}/body;
    server {{
        listen {HOST}:{port};
        root {root};
        keepalive_requests 100000;
        location / {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            client_max_body_size 16m;
            {extra}
        }}
    }}
}}
"""
            )
            p = Proc([binary, "-c", str(conf), "-e", "stderr"], name=f"{name}:{port}", env=env)
            try:
                m = p.wait_for(r"start worker process|bind\(\) to .* failed|emerg")
                if "start worker" in m[0]:
                    yield p, port, root
                    return
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.stop()
        raise AssertionError("could not start nginx on a free port")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _nginx_bin() -> str:
    path = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    return path or require_binary("nginx")
