"""Everyday Redis clients through replicaproxy: how often each scenario comes out right.

Each scenario runs a real client (redis-cli, redis-py) against two real Redis
servers behind the proxy, several times, and counts the runs that came out as a
user would want:

- ``cli-sync``/``cli-async``: redis-cli pipes 4000 SETs; the primary is killed
  (-9) at a random point. Right: all 4000 acknowledged, all on the replica.
- ``py-sync``/``py-async``: redis-py 8 (``HELLO 3``) sends INFO, TIME, CLIENT ID,
  COMMAND DOCS, SMEMBERS/KEYS/HGETALL of hashtable-encoded data and SCAN, then
  SET/GET in a loop across kill -9 of the primary. Right: the same connection
  answers every request and the replica has every key.
- ``refused``: a replica that answers the login with an error and closes, while
  the client goes on writing. Right: the replica ends stale.
- ``too-big``: a client sends a too-big inline request (both servers answer an
  error and close that connection). Right: no failover, nobody stale.
- ``idle``: a connection idle when the primary is killed (health checks every
  30 s, so only the session can notice). Right: its next command is answered.
- ``logged``: ten sessions whose replies diverge (SPOP). Right: within 5 s the
  log accounts for all ten.

    python bench/real_clients.py [--runs N] [--src DIR] [--protocol P] [--only S,...]

``--src DIR`` runs the replicaproxy of another checkout (``DIR/src``, pure Python),
for a before/after comparison; ``--protocol bytes`` is what a checkout without
framed protocols runs. Prints one line per scenario: right runs out of all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
WAIT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def cli(port: int, *args: str) -> str:
    out = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    return out.stdout.strip()


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until("redis-server", lambda: cli(port, "PING") == "PONG")
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


class Proxy:
    """``replicaproxy run`` from the chosen source, its log collected."""

    def __init__(self, tmp: Path, src: Path | None, keys: str, tables: str) -> None:
        self.port = free_port()
        self.admin = free_port()
        config = tmp / "proxy.toml"
        config.write_text(
            f'[proxy]\nlisten = "{HOST}:{self.port}"\nstate_file = "{tmp / "state.json"}"\n'
            f'{keys}[admin]\nlisten = "{HOST}:{self.admin}"\n{tables}'
        )
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = str(src / "src")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replicaproxy", "run", "--config", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until("the proxy", lambda: any("listening on" in line for line in self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{HOST}:{self.admin}/status", timeout=WAIT) as r:
            return dict(json.load(r))

    def states(self) -> dict[str, str]:
        return {str(b["name"]): str(b["state"]) for b in self.status()["backends"]}

    def mark_synced(self, name: str) -> None:
        url = f"http://{HOST}:{self.admin}/backends/{name}/mark-synced"
        urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=WAIT).read()

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def proxy(
    tmp: Path, src: Path | None, pport: int, rport: int, *, protocol: str, mode: str = "async",
    extra: str = "", health: str = "interval = 0.2\ntimeout = 0.5",
) -> Proxy:  # fmt: skip
    """A proxy in front of a primary and a replica; ``bytes`` needs no setting (a
    checkout from before framed protocols has none)."""
    keys = f'mode = "{mode}"\n{extra}'
    if protocol != "bytes":
        keys += f'protocol = "{protocol}"\n'
    tables = (
        f"[health]\n{health}\n"
        f'[[backend]]\nname = "primary"\naddress = "{HOST}:{pport}"\nrole = "primary"\n'
        f'[[backend]]\nname = "replica"\naddress = "{HOST}:{rport}"\nrole = "replica"\n'
    )
    return Proxy(tmp, src, keys, tables)


@contextlib.contextmanager
def world(
    src: Path | None, protocol: str, mode: str = "async", **more: str
) -> Iterator[tuple[Proxy, subprocess.Popen[bytes], int, int]]:
    """Two fresh Redis servers and a proxy in front of them."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "p").mkdir()
        (tmp / "r").mkdir()
        with redis_server(tmp / "p") as (primary, pport), redis_server(tmp / "r") as (_, rport):
            px = proxy(tmp, src, pport, rport, protocol=protocol, mode=mode, **more)
            try:
                yield px, primary, pport, rport
            finally:
                px.close()


def cli_pipe(src: Path | None, protocol: str, mode: str) -> bool:
    with world(src, protocol, mode) as (px, primary, pport, rport), tempfile.TemporaryFile() as f:
        f.write("".join(f"SET key:{i} value:{i}\n" for i in range(4000)).encode())
        f.seek(0)
        run = subprocess.Popen(
            ["redis-cli", "-h", HOST, "-p", str(px.port)], stdin=f, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        kill_after = random.randint(100, 3500)
        wait_until("keys", lambda: int(cli(pport, "DBSIZE") or 0) >= kill_after)
        primary.kill()
        try:
            out, _ = run.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            run.kill()
            return False
        return out.decode().split().count("OK") == 4000 and cli(rport, "DBSIZE") == "4000"


def redis_py(src: Path | None, protocol: str, mode: str) -> bool:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    with world(src, protocol, mode) as (px, primary, _pport, rport):
        r = redis.Redis(host=HOST, port=px.port, protocol=3, single_connection_client=True,
                        retry=Retry(NoBackoff(), 0), socket_timeout=10)  # fmt: skip
        try:
            r.ping()
            sock = r.connection._sock  # type: ignore[union-attr]
            r.sadd("s", *range(200))
            r.hset("h", mapping={f"f{i}": i for i in range(600)})
            r.info()
            r.time()
            r.client_id()
            conn = r.connection
            assert conn is not None
            conn.send_command("COMMAND", "DOCS")  # type: ignore[no-untyped-call]
            conn.read_response()
            r.smembers("s")
            r.keys("*")
            r.hgetall("h")
            list(r.scan_iter(count=1))
            for i in range(300):
                if i == 150:
                    primary.kill()
                r.set(f"k{i}", i)
                if r.get(f"k{i}") != str(i).encode():
                    return False
            return conn._sock is sock and cli(rport, "GET", "k299") == "299"
        except redis.RedisError:
            return False
        finally:
            r.close()


class Refusing:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.refused = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                if conn.recv(100):
                    conn.sendall(b"-ERR authentication failed\r\n")
                    conn.shutdown(socket.SHUT_RDWR)
                    self.refused.set()


def refused(src: Path | None, protocol: str, runs: int) -> tuple[int, int]:
    bad = Refusing()
    with tempfile.TemporaryDirectory() as d, redis_server(Path(d)) as (_, pport):
        px = proxy(Path(d), src, pport, bad.port, protocol=protocol, health="interval = 30")
        right = 0
        try:
            for _ in range(runs):
                bad.refused.clear()
                with socket.create_connection((HOST, px.port), timeout=WAIT) as s:
                    s.sendall(b"PING\r\n")
                    s.recv(100)
                    bad.refused.wait(WAIT)
                    for j in range(5):
                        s.sendall(b"SET k%d v\r\n" % j)
                        s.recv(100)
                wait_until("session end", lambda: px.status()["sessions_active"] == 0)
                if px.states()["replica"] == "stale":
                    right += 1
                    px.mark_synced("replica")
        finally:
            px.close()
            bad.sock.close()
    return right, runs


def too_big(src: Path | None, protocol: str) -> bool:
    with world(src, protocol) as (px, _primary, _pport, _rport):
        with (
            socket.create_connection((HOST, px.port), timeout=WAIT) as s,
            contextlib.suppress(OSError),
        ):
            s.sendall(b"x" * 70_000)
            s.recv(100)
        with socket.create_connection((HOST, px.port), timeout=WAIT) as s:
            s.sendall(b"PING\r\n")
            s.recv(100)
        time.sleep(1)  # (any failover would be logged within a second)
        st = px.status()
        return st["epoch"] == 0 and px.states()["replica"] == "in_sync"


def idle(src: Path | None, protocol: str) -> bool:
    with (
        world(src, protocol, health="interval = 30\ntimeout = 1") as (px, primary, _, _r),
        socket.create_connection((HOST, px.port), timeout=WAIT) as s,
    ):
        s.sendall(b"SET a 1\r\n")
        s.recv(100)
        primary.kill()
        primary.wait()
        time.sleep(1)  # the idle connection, with its primary gone
        try:
            s.sendall(b"GET a\r\n")
            return s.recv(100) == b"$1\r\n1\r\n"
        except OSError:
            return False


def logged(src: Path | None, protocol: str) -> tuple[int, int]:
    with world(src, protocol, extra='divergence = "log"\n') as (px, _p, _pp, _rp):
        for i in range(10):
            with socket.create_connection((HOST, px.port), timeout=WAIT) as s:
                s.sendall(b"SADD s%d " % i + b" ".join(b"%d" % j for j in range(50)) + b"\r\n")
                s.recv(100)
                s.sendall(b"SPOP s%d 5\r\n" % i)
                s.recv(1000)
        time.sleep(6)  # what a reader of the log sees 5 s after the last divergence
        summary = r"(\d+) more like this in the last"  # (this checkout's summary line)
        one = px.count(r"differs") - px.count(summary)
        merged = 0
        for line in px.lines:  # (an older checkout adds its count to the next line)
            for m in re.finditer(r"\((\d+) more like this not logged\)|" + summary, line):
                merged += int(m[1] or m[2])
        return one + merged, 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--src", type=Path, default=None, help="another checkout to run")
    parser.add_argument("--protocol", default="resp", choices=["bytes", "resp"])
    parser.add_argument("--only", default="", help="comma-separated scenarios")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        return not only or name in only

    src, proto, n = args.src, args.protocol, args.runs
    who = f"({src or 'this checkout'}, protocol {proto})"

    def report(name: str, right: int, total: int, what: str) -> None:
        print(f"{name:10} {right}/{total} {what}  {who}", flush=True)

    for mode in ("sync", "async"):
        if want(f"cli-{mode}"):
            ok = sum(cli_pipe(src, proto, mode) for _ in range(n))
            report(f"cli-{mode}", ok, n, "runs: 4000 SETs acknowledged, all on the replica")
    for mode in ("sync", "async"):
        if want(f"py-{mode}"):
            ok = sum(redis_py(src, proto, mode) for _ in range(n))
            report(f"py-{mode}", ok, n, "runs: redis-py's connection survived the kill")
    if want("refused"):
        report("refused", *refused(src, proto, 20), "sessions: the refusing replica ended stale")
    if want("too-big"):
        ok = sum(too_big(src, proto) for _ in range(n))
        report("too-big", ok, n, "runs: no failover, nobody stale")
    if want("idle"):
        ok = sum(idle(src, proto) for _ in range(n))
        report("idle", ok, n, "runs: the idle connection's next command answered")
    if want("logged"):
        report("logged", *logged(src, proto), "divergences accounted for in the log after 5 s")


if __name__ == "__main__":
    main()
