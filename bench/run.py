"""replicaproxy benchmarks: what mirroring costs, next to HAProxy and a direct connection.

Everything runs on this machine, on loopback, started and stopped here. Setups:
``direct`` (the client talks to the server), ``haproxy`` (HAProxy ``mode tcp``, one
thread), ``rp0``/``rp1``/``rp2`` (replicaproxy, async mode, 0/1/2 replicas) and
``rp1sync`` (sync mode, 1 replica), ``rp1resp``/``rp1syncresp`` (the same with
``protocol = "resp"``: replies compared as RESP messages; Redis workloads only); for
reference, ``tee0``/``tee1`` (``tee.py``: the
least a Python forwarder with 0/1 replica can do; request/response and churn). Every setup
runs each workload in turn within a round (so a slow phase of a busy machine hits them
alike), in the opposite order every other round (so that a machine growing busier or
quieter during a round favours no setup), several rounds, medians.

    python bench/run.py [--quick] [--rounds N] [--only SETUP,...] [--workloads W,...]
                        [--baseline DIR] [--replica-flush MS]

With ``--baseline DIR`` (a checkout of another commit, e.g. from ``git worktree add``)
each replicaproxy setup also runs from ``DIR/src``, as ``rp1@base`` and so on, in the
same rounds: a change measured against what it changed, side by side. With
``--replica-flush 5ms`` the replicaproxy and tee setups batch a replica's input on a
tick of that length instead of their default 20 ms.

Results: a markdown table on stdout and ``bench/results/{latest,quick}.{md,json,png}``
(a run of a subset writes ``partial.*``, a run with a baseline ``compare.*``). Never an
assertion: targets are reported PASS/FAIL and the exit status is 0 whatever they say;
it is non-zero only when the benchmark itself could not run (a missing program, a
process that died).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# bench/protocols.py imports this module as ``run``: the same module when it is __main__.
sys.modules.setdefault("run", sys.modules[__name__])
import protocols  # noqa: E402  (the protocol workloads: http, pg, mc)

HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
LOADGEN = HERE / "loadgen.py"
SINK = HERE / "bulk_sink.py"
TEE = HERE / "tee.py"
TICKS = os.sysconf("SC_CLK_TCK")
# Any one start-up or tear-down wait. Python starting replicaproxy on a loaded 2-core
# machine takes about a second; 30 s means it is not coming.
WAIT = 30.0

# (Each setup a target compares with another runs next to it: rp1 and rp1resp, rp1sync
# and rp1syncresp; see run().)
SETUPS = (
    "direct", "haproxy", "rp0", "rp1", "rp1resp", "rp1sync", "rp1syncresp", "rp2", "tee0", "tee1",
)  # fmt: skip
#: (replicas, mode, protocol) of each replicaproxy setup.
PROXIES = {
    "rp0": (0, "async", "bytes"),
    "rp1": (1, "async", "bytes"),
    "rp2": (2, "async", "bytes"),
    "rp1sync": (1, "sync", "bytes"),
    "rp1resp": (1, "async", "resp"),
    "rp1syncresp": (1, "sync", "resp"),
}
#: The workloads the resp setups run: what Redis answers (the sink speaks no RESP).
RESP_WORKLOADS = {"rr", "p16", "lat"}
#: Replicas of each reference setup (tee.py: a bare forwarder, a 20 ms replica tick).
TEES = {"tee0": 0, "tee1": 1}
#: The workloads the reference setups run: they hold unbounded batches, so no bulk.
TEE_WORKLOADS = {"rr", "p16", "churn"}
#: The suffix of a setup run from the --baseline checkout.
BASE = "@base"
WORKLOADS = {
    "rr": "redis-benchmark SET+GET, 50 connections, no pipelining",
    "p16": "redis-benchmark SET+GET, 50 connections, 16 requests pipelined",
    "lat": "redis-benchmark GET, 1 connection: latency without queueing",
    "bulk": "one-way stream into a sink, 256 KiB writes",
    "churn": "redis-benchmark PING, a new connection per request (-k 0), 10 at a time",
    "idle": "sessions held open: proxy RSS per session (haproxy and rp1)",
    **protocols.DESCRIPTIONS,
}
#: Workloads served by Redis (the others by the sink).
REDIS_WORKLOADS = {"rr", "p16", "lat", "churn", "idle"}
#: Setups the idle test runs on: the target's (rp1) and HAProxy for comparison.
IDLE_SETUPS = ("haproxy", "rp1")
#: Where each program comes from on Debian.
PACKAGES = {"haproxy": "haproxy", "redis-server": "redis-server", "redis-benchmark": "redis-tools"}
# HAProxy's global maxconn per the issue; raised only as far as the idle test needs.
HAPROXY_MAXCONN = 4000


@dataclass(frozen=True)
class Plan:
    """How much of each workload one run of one setup does."""

    rounds: int
    rr_requests: int  # per command (SET and GET each)
    p16_requests: int  # per command
    lat_requests: int
    bulk_bytes: int
    churn_connections: int
    idle_sessions: int


# Full: about 10 minutes on 2 cores; quick: about a minute.
FULL = Plan(5, 50_000, 400_000, 5_000, 1 << 30, 10_000, 5_000)
QUICK = Plan(2, 8_000, 64_000, 1_000, 64 << 20, 2_000, 5_000)
#: Churn: connections open at once (redis-benchmark -c), as in issue 15's figures.
CHURN_CLIENTS = 10
#: A replicaproxy log line below WARNING (the access line of every session, say).
QUIET = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO) ")


class BenchError(Exception):
    """The benchmark could not run (not a slow result: those are only reported)."""


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of process ``pid`` (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS  # utime, stime (fields 14, 15)


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (every process, the kernel, interrupts)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / TICKS  # user..steal, without guest (in user)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


@dataclass
class Child:
    """A server or proxy started for the benchmark, in its own process group."""

    name: str
    args: list[str]
    port: int
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] = field(init=False)
    log_seen: int = 0
    #: A replicaproxy's state file, removed on restart so it starts with every replica in sync.
    state_file: Path | None = None

    def __post_init__(self) -> None:
        self.launch()

    def launch(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own group: stop() kills what it started too
            )

    def restart(self) -> None:
        """Start afresh (a replicaproxy whose replica went stale: its view is reset)."""
        self.stop()
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)
        self.log_seen = self.log.stat().st_size
        self.launch()
        self.wait_ready(time.monotonic() + WAIT)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(
                f"{self.name} exited with status {self.popen.returncode}\n{self.tail()}"
            )

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def new_log_lines(self) -> list[str]:
        """What the process wrote since the last call, but replicaproxy's INFO lines (an
        access line per session, the lines of its start): warnings, errors, the rest."""
        with self.log.open("rb") as f:
            f.seek(self.log_seen)
            new = f.read()
        self.log_seen += len(new)
        return [x for x in new.decode(errors="replace").splitlines() if not QUIET.match(x)]

    def wait_ready(self, deadline: float) -> None:
        """Wait until the port accepts (a connect, retried every 20 ms): the same for every
        setup, whatever each of them logs when it is ready."""
        while True:
            self.check_alive()
            try:
                socket.create_connection((HOST, self.port), timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.name}: nothing accepts on port {self.port} after {WAIT} s\n"
                        + self.tail()
                    ) from None
                time.sleep(0.02)  # the retry interval of a bounded readiness poll

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if still there after a bounded wait."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.popen.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        if self.popen.poll() is None:  # not even SIGKILL within 5 s: leave a trace
            print(f"bench: {self.name} (pid {self.popen.pid}) did not exit", file=sys.stderr)


class Processes:
    """Every child of one benchmark; ``close`` (called from ``finally``) stops them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        args: list[str],
        port: int,
        state: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        child = Child(name, args, port, self.tmp / f"{name}.log", env, state_file=state)
        self.children.append(child)
        return child

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT
        for child in self.children:
            child.wait_ready(deadline)

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()


# ------------------------------------------------------------------ the setups


@dataclass
class Target:
    """Where a workload connects for one setup, and whose CPU and memory count."""

    setup: str
    port: int
    proxy: Child | None  # None: direct


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (apt-get install {PACKAGES[name]})")
    return path


def haproxy_config(port: int, server: int, maxconn: int, threads: int = 1) -> str:
    return (
        "global\n"
        f"    maxconn {maxconn}\n"
        f"    nbthread {threads}\n"
        "defaults\n"
        "    mode tcp\n"
        f"    maxconn {maxconn}\n"
        "    timeout connect 5s\n"
        "    timeout client 10m\n"
        "    timeout server 10m\n"
        "listen bench\n"
        f"    bind {HOST}:{port}\n"
        f"    server primary {HOST}:{server}\n"
    )


def redis_server(procs: Processes, name: str) -> Child:
    """A Redis server without persistence, in a directory of its own (not waited for)."""
    data = procs.tmp / name
    data.mkdir()
    port = free_port()
    args = [program("redis-server"), "--port", str(port), "--bind", HOST,
            "--save", "", "--appendonly", "no", "--dir", str(data)]  # fmt: skip
    return procs.start(name, args, port)


def replicas(setup: str) -> int:
    """How many replicas a replicaproxy setup has (0 for the others, tee1 too: it logs nothing)."""
    return PROXIES.get(setup.removesuffix(BASE), (0, "", ""))[0]


def runs(setup: str, work: str) -> bool:
    """Whether ``setup`` runs workload ``work`` at all."""
    if setup in TEES:
        return work in TEE_WORKLOADS
    if PROXIES.get(setup.removesuffix(BASE), (0, "", "bytes"))[2] != "bytes":
        return work in RESP_WORKLOADS
    return True


def build(
    procs: Processes, kind: str, setups: list[str], maxconn: int, out: Outcome
) -> dict[str, Target]:
    """Start the servers (``kind`` redis or sink) and a proxy for each setup (not waited).

    Each setup has servers of its own: a Redis primary written to directly or through
    HAProxy would hold keys its replicas never saw, and GETs through replicaproxy would
    then differ (divergence reports, a different code path). Sinks keep no state but get
    the same treatment, so every setup is built the same way.
    """
    tmp = procs.tmp
    baseline = Path(out.baseline) if out.baseline else None
    flush: list[str] = []  # replicaproxy's replica_flush is a setting of the file only
    if out.replica_flush:
        config = tmp / "replica-flush.toml"
        config.write_text(f'[proxy]\nreplica_flush = "{out.replica_flush}"\n')
        flush = ["--config", str(config)]

    def server(name: str) -> Child:
        if kind == "redis":
            return redis_server(procs, name)
        port = free_port()
        return procs.start(name, [sys.executable, str(SINK), str(port)], port)

    targets = {}
    for setup in setups:
        if kind != "redis" and not runs(setup, "bulk"):
            continue
        primary = server(f"{kind}-{setup}-primary")
        if setup == "direct":
            targets[setup] = Target(setup, primary.port, None)
            continue
        port = free_port()
        name = f"{kind}-{setup}"
        if setup == "haproxy":
            cfg = tmp / f"{name}.cfg"
            cfg.write_text(haproxy_config(port, primary.port, maxconn))
            child = procs.start(name, [program("haproxy"), "-f", str(cfg), "-db"], port)
            targets[setup] = Target(setup, port, child)
            continue
        if setup in TEES:
            args = [sys.executable, str(TEE), str(port), str(primary.port)]
            args += [str(server(f"{name}-replica{i + 1}").port) for i in range(TEES[setup])]
            if out.replica_flush:
                args += ["--flush", out.replica_flush.removesuffix("ms")]
            targets[setup] = Target(setup, port, procs.start(name, args, port))
            continue
        count, mode, protocol = PROXIES[setup.removesuffix(BASE)]
        env = None
        if setup.endswith(BASE):
            assert baseline is not None
            env = {**os.environ, "PYTHONPATH": str(baseline / "src")}
        state = tmp / f"{name}.state.json"
        args = [sys.executable, "-m", "replicaproxy", "run", *flush,
                "--listen", f"{HOST}:{port}", "--primary", f"{HOST}:{primary.port}",
                "--mode", mode, "--state-file", str(state),
                *(["--protocol", protocol] if protocol != "bytes" else [])]  # fmt: skip
        for i in range(count):
            args += ["--replica", f"{HOST}:{server(f'{name}-replica{i + 1}').port}"]
        targets[setup] = Target(setup, port, procs.start(name, args, port, state, env))
    return targets


# ------------------------------------------------------------------ workloads


def run_tool(args: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(args)}: no result after {timeout:.0f} s") from None
    if done.returncode != 0:
        raise BenchError(
            f"{' '.join(args)}: exit status {done.returncode}\n{done.stderr[-2000:]}"
            f"{done.stdout[-1000:]}"
        )
    return done.stdout


def redis_benchmark(
    port: int, tests: str, requests: int, clients: int, pipeline: int
) -> dict[str, float]:
    """Requests/s and p50/p99 latency (ms) from ``redis-benchmark --csv``.

    With several tests (SET and GET), req/s is the total requests over the total time
    (the harmonic mean of the per-test rates) and the latencies are the tests' mean.
    """
    args = [program("redis-benchmark"), "-h", HOST, "-p", str(port), "-t", tests,
            "-n", str(requests), "-c", str(clients), "-P", str(pipeline),
            "-r", "100000", "--csv"]  # fmt: skip
    # A floor of 500 requests/s: far below any setup here; slower means stuck.
    out = run_tool(args, timeout=60 + requests * len(tests.split(",")) / 500)
    rows = list(csv.DictReader(io.StringIO(out)))
    if not rows or any("rps" not in r for r in rows):
        raise BenchError(f"redis-benchmark printed no CSV rows:\n{out[-1000:]}")
    return {
        "requests": float(requests * len(rows)),
        "rps": statistics.harmonic_mean([float(r["rps"]) for r in rows]),
        "p50_ms": statistics.fmean(float(r["p50_latency_ms"]) for r in rows),
        "p99_ms": statistics.fmean(float(r["p99_latency_ms"]) for r in rows),
    }


def churn(port: int, connections: int) -> dict[str, float]:
    """New connections/s and p50/p99 latency (ms) from ``redis-benchmark -k 0``.

    Each request is a PING on a connection of its own (connect, PING, +PONG, close), so
    requests/s is new connections/s and the latency includes the connect. A generator
    faster than the proxies: HAProxy reached 10-12k connections/s with it here, and
    4.2k with the Python one (loadgen.py) that came before.
    """
    args = [program("redis-benchmark"), "-h", HOST, "-p", str(port), "-t", "ping_mbulk",
            "-n", str(connections), "-c", str(CHURN_CLIENTS), "-k", "0", "--csv"]  # fmt: skip
    # A floor of 100 connections/s: far below any setup here; slower means stuck.
    out = run_tool(args, timeout=60 + connections / 100)
    rows = list(csv.DictReader(io.StringIO(out)))
    if len(rows) != 1 or "rps" not in rows[0]:
        raise BenchError(f"redis-benchmark -k 0 printed no CSV row:\n{out[-1000:]}")
    return {
        "connections": float(connections),
        "conn_s": float(rows[0]["rps"]),
        "p50_ms": float(rows[0]["p50_latency_ms"]),
        "p99_ms": float(rows[0]["p99_latency_ms"]),
    }


def loadgen(args: list[str], timeout: float) -> dict[str, float]:
    out = run_tool([sys.executable, str(LOADGEN), *args], timeout)
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def idle_sessions(target: Target, count: int) -> dict[str, float]:
    """Proxy RSS growth while ``count`` sessions, each used once, are held open."""
    assert target.proxy is not None
    pid = target.proxy.popen.pid
    before = rss_kib(pid)
    args = [sys.executable, str(LOADGEN), "idle", str(target.port), str(count)]
    holder = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        # 200 sessions/s is far below any setup here; slower means stuck.
        ready, _, _ = select.select([holder.stdout], [], [], 30 + count / 200)
        line = holder.stdout.readline() if ready else b""
        if not line:
            holder.kill()
            err = holder.communicate(timeout=WAIT)[1].decode(errors="replace")
            raise BenchError(f"idle: {count} sessions through {target.setup} not opened\n{err}")
        after = rss_kib(pid)
        opened = json.loads(line)
        holder.stdin.close()
        holder.wait(WAIT)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(WAIT)
    return {
        "sessions": float(count),
        "open_seconds": float(opened["seconds"]),
        "rss_before_kib": float(before),
        "rss_after_kib": float(after),
        "kib_per_session": (after - before) / count,
    }


def measure(target: Target, units: float, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run ``fn``; add the proxy's CPU time for it, per unit (request, MiB, connection).

    User time apart too: the proxy's own code, where system time is mostly the
    kernel's TCP work on loopback (both ends of it), alike for every proxy. And the
    whole machine's: what every process of the setup took together, and how many
    cores that kept busy on average (as many as the machine has: CPU-bound).
    """
    pid = target.proxy.popen.pid if target.proxy else None
    user0, sys0 = cpu_seconds(pid) if pid else (0.0, 0.0)
    busy0, t0 = machine_busy(), time.monotonic()
    result = fn()
    busy = machine_busy() - busy0
    result["machine_cpu_per_unit"] = busy / units
    result["cores_busy"] = busy / (time.monotonic() - t0)
    if pid:
        user1, sys1 = cpu_seconds(pid)
        cpu = user1 - user0 + sys1 - sys0
        result["cpu_s"] = cpu
        result["cpu_us_per_unit"] = cpu / units * 1e6
        result["user_us_per_unit"] = (user1 - user0) / units * 1e6
    return result


def run_workload(work: str, target: Target, plan: Plan) -> dict[str, float]:
    port = target.port
    if work == "rr":
        units = 2 * plan.rr_requests
        return measure(
            target, units, lambda: redis_benchmark(port, "set,get", plan.rr_requests, 50, 1)
        )
    if work == "p16":
        units = 2 * plan.p16_requests
        return measure(
            target, units, lambda: redis_benchmark(port, "set,get", plan.p16_requests, 50, 16)
        )
    if work == "lat":
        units = plan.lat_requests
        return measure(target, units, lambda: redis_benchmark(port, "get", units, 1, 1))
    if work == "bulk":
        size = plan.bulk_bytes
        # 20 MiB/s is far below any setup here; slower means stuck.
        bulk_args = ["bulk", str(port), str(size)]
        return measure(target, size / (1 << 20), lambda: loadgen(bulk_args, 60 + size / (20 << 20)))
    if work == "churn":
        n = plan.churn_connections
        return measure(target, n, lambda: churn(port, n))
    raise BenchError(f"unknown workload {work}")


# ------------------------------------------------------------------ the run


@dataclass
class Outcome:
    """Everything one run measured, as saved in the JSON file."""

    kind: str
    plan: Plan
    setups: list[str]
    workloads: list[str]
    machine: dict[str, str] = field(default_factory=dict)
    started: str = ""
    seconds: float = 0.0
    samples: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    medians: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: Log lines the proxies wrote during the run (they log warnings only): a replica
    #: dropped from a session or marked stale makes its setup's numbers suspect.
    warnings: dict[str, list[str]] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    #: The --baseline checkout ("": none) and its commit.
    baseline: str = ""
    baseline_commit: str = ""
    #: --replica-flush ("": each setup's default, 20 ms).
    replica_flush: str = ""

    def get(self, setup: str, work: str, key: str) -> float | None:
        return self.medians.get(setup, {}).get(work, {}).get(key)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def describe(work: str, sample: dict[str, float]) -> str:
    cpu = sample.get("cpu_us_per_unit")
    per = {"bulk": "us/MiB", "churn": "us/conn"}.get(work, "us/req")
    cpu_text = f", proxy CPU {cpu:.1f} {per}" if cpu is not None else ""
    if work == "bulk":
        return f"{sample['mib_s']:,.0f} MiB/s{cpu_text}"
    if work == "churn":
        return f"{sample['conn_s']:,.0f} conn/s, p50 {sample['p50_ms']:.3f} ms{cpu_text}"
    if work == "lat":
        return f"p50 {sample['p50_ms']:.3f} ms, p99 {sample['p99_ms']:.3f} ms"
    return f"{sample['rps']:,.0f} req/s, p50 {sample['p50_ms']:.3f} ms{cpu_text}"


def collect_warnings(out: Outcome, target: Target, where: str) -> bool:
    """Record what the proxy logged (warnings only); True if a replica went stale."""
    if target.proxy is None:
        return False
    lines = target.proxy.new_log_lines()
    if lines:
        out.warnings.setdefault(target.setup, []).extend(f"[{where}] {x}" for x in lines)
        progress(f"  ! {target.proxy.name} logged: " + " | ".join(x[:300] for x in lines[:3]))
    return any("stale" in x for x in lines)


def run(out: Outcome, procs: Processes) -> None:
    plan, setups = out.plan, out.setups
    redis_work = [w for w in out.workloads if w in REDIS_WORKLOADS]
    maxconn = HAPROXY_MAXCONN
    if "idle" in out.workloads:
        maxconn = max(maxconn, plan.idle_sessions + 100)
    worlds: dict[str, dict[str, Target]] = {}
    if redis_work:
        worlds["redis"] = build(procs, "redis", setups, maxconn, out)
    if "bulk" in out.workloads:
        worlds["sink"] = build(procs, "sink", setups, maxconn, out)
    progress(f"starting {len(procs.children)} servers and proxies")
    procs.wait_ready()

    def settle(target: Target, where: str) -> bool:
        """Note the proxy's warnings; restart it if a replica went stale (True then)."""
        stale = collect_warnings(out, target, where)
        if stale and target.proxy is not None:
            progress(f"  ! {target.setup}: a replica went stale; restarting with a fresh view")
            target.proxy.restart()
        return stale

    # Warm-up: first connections, first allocations, code paths run once. A small bulk
    # transfer (8 MiB) stays within one replica buffer, so it drops no replica.
    uses_rb = bool({"rr", "p16", "lat", "churn"} & set(out.workloads))
    for t in worlds.get("redis", {}).values():
        if uses_rb:
            redis_benchmark(t.port, "set,get", 2000, 50, 1)
        else:  # idle only: redis-benchmark may not even be installed
            loadgen(["churn", str(t.port), "200"], WAIT)
        settle(t, "warm-up")
    for t in worlds.get("sink", {}).values():
        loadgen(["bulk", str(t.port), str(8 << 20)], WAIT)
        settle(t, "warm-up")

    timed = [w for w in out.workloads if w != "idle" and w not in protocols.WORKLOADS]
    for rnd in range(1, plan.rounds + 1):
        # Each resp setup runs right after the bytes setup it is compared with (see
        # SETUPS). This machine's speed drifts by 15-30% over tens of seconds;
        # alternating the order cancels a drift that lasts a round, where a fixed
        # order would hand it to the later setup.
        order = setups if rnd % 2 else setups[::-1]
        for work in timed:
            world = worlds["sink" if work == "bulk" else "redis"]
            for setup in order:
                if not runs(setup, work):
                    continue
                target = world[setup]
                sample = run_workload(work, target, plan)
                if replicas(setup):
                    # 1: a replica left (stale): this run was not fully mirrored.
                    sample["replica_dropped"] = float(settle(target, f"round {rnd} {work}"))
                else:
                    collect_warnings(out, target, f"round {rnd} {work}")
                out.samples.setdefault(setup, {}).setdefault(work, []).append(sample)
                note = " (a replica was dropped)" if sample.get("replica_dropped") else ""
                progress(
                    f"round {rnd}/{plan.rounds} {work:5} {setup:8} {describe(work, sample)}{note}"
                )
    if "idle" in out.workloads:
        for setup in IDLE_SETUPS:
            holder = worlds["redis"].get(setup)
            if holder is None:
                continue
            sample = idle_sessions(holder, plan.idle_sessions)
            out.samples.setdefault(setup, {})["idle"] = [sample]
            progress(
                f"idle  {setup:8} {sample['kib_per_session']:.1f} KiB per session "
                f"({plan.idle_sessions} sessions)"
            )
            collect_warnings(out, holder, "idle")
    for t in (t for world in worlds.values() for t in world.values()):
        if t.proxy is not None:
            t.proxy.check_alive()

    for setup, works in out.samples.items():
        out.medians[setup] = {work: summarize(samples) for work, samples in works.items()}


def summarize(samples: list[dict[str, float]]) -> dict[str, float]:
    """Medians over the rounds; ``replica_dropped`` is a count of runs instead."""
    keys = set().union(*samples)
    med = {k: statistics.median(s[k] for s in samples if k in s) for k in sorted(keys)}
    if "replica_dropped" in keys:
        med["replica_dropped"] = sum(s.get("replica_dropped", 0.0) for s in samples)
        med["runs"] = float(len(samples))
    return med


# ------------------------------------------------------------------ report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def judge(out: Outcome) -> None:
    """The targets of issues 6 and 15, as PASS/FAIL lines (never an exit status)."""
    checks = [
        # (label, setup, workload, key, against, bound, at most?)
        ("1 replica, request/response: proxy CPU/request <= 1.25x HAProxy's",
         "rp1", "rr", "cpu_us_per_unit", "haproxy", 1.25, True),
        ("1 replica, request/response: requests/s >= 0.8x HAProxy's",
         "rp1", "rr", "rps", "haproxy", 0.8, False),
        ("0 replicas, request/response: proxy CPU/request <= 1.1x HAProxy's",
         "rp0", "rr", "cpu_us_per_unit", "haproxy", 1.1, True),
        ("1 replica, bulk: MiB/s >= 0.9x direct",
         "rp1", "bulk", "mib_s", "direct", 0.9, False),
        ("0 replicas, connection churn: new connections/s >= 0.5x HAProxy's",
         "rp0", "churn", "conn_s", "haproxy", 0.5, False),
        ("1 replica, connection churn: new connections/s >= 0.35x HAProxy's",
         "rp1", "churn", "conn_s", "haproxy", 0.35, False),
    ]  # fmt: skip
    checks += [
        (f"protocol resp, {kind}, {label}: proxy CPU/request <= 1.15x protocol bytes",
         f"{mode}resp", work, "cpu_us_per_unit", mode, 1.15, True)
        for mode, kind in (("rp1", "async"), ("rp1sync", "sync"))
        for work, label in (("rr", "request/response"), ("p16", "pipelined"))
    ]  # fmt: skip
    for label, setup, work, key, against, bound, at_most in checks:
        r = ratio(out.get(setup, work, key), out.get(against, work, key))
        if r is None:
            result = "not measured"
        else:
            result = "PASS" if (r <= bound if at_most else r >= bound) else "FAIL"
            dropped = out.get(setup, work, "replica_dropped")
            if dropped:
                runs = out.get(setup, work, "runs") or 0
                result += f" (but the replica was dropped in {dropped:.0f} of {runs:.0f} runs)"
        out.targets.append(
            {"target": label, "measured": r, "unit": "x", "bound": bound, "result": result}
        )
    kib = out.get("rp1", "idle", "kib_per_session")
    out.targets.append(
        {
            "target": "1 replica, idle: RSS per session <= 20 KiB",
            "measured": kib,
            "unit": "KiB",
            "bound": 20.0,
            "result": "not measured" if kib is None else "PASS" if kib <= 20 else "FAIL",
        }
    )


def sync_cost(out: Outcome) -> list[str]:
    """What sync mode costs against async, both with 1 replica (no target)."""
    lines = []
    pairs = [
        ("requests/s, request/response", "rr", "rps", ",.0f", ""),
        ("proxy CPU per request", "rr", "cpu_us_per_unit", ".1f", " us"),
        ("p50 latency, 50 connections", "rr", "p50_ms", ".3f", " ms"),
        ("p50 latency, 1 connection", "lat", "p50_ms", ".3f", " ms"),
        ("p99 latency, 1 connection", "lat", "p99_ms", ".3f", " ms"),
        ("requests/s, pipelined -P 16", "p16", "rps", ",.0f", ""),
        ("bulk MiB/s", "bulk", "mib_s", ",.0f", ""),
        ("connections/s, churn", "churn", "conn_s", ",.0f", ""),
    ]
    for label, work, key, spec, unit in pairs:
        s, a = out.get("rp1sync", work, key), out.get("rp1", work, key)
        if s is None or a is None:
            continue
        lines.append(
            f"| {label} | {s:{spec}}{unit} | {a:{spec}}{unit} | {fmt(ratio(s, a), '.2f', 'x')} |"
        )
    if not lines:
        return []
    return ["| figure | sync | async | sync / async |", "|---|---|---|---|", *lines]


def table(out: Outcome) -> str:
    """The whole report in markdown."""
    p, g = out.plan, out.get
    md: list[str] = []

    def section(title: str, header: list[str], rows: list[list[str]]) -> None:
        if not rows:
            return
        md.extend(["", f"### {title}", "", "| " + " | ".join(header) + " |"])
        md.append("|" + "---|" * len(header))
        md.extend("| " + " | ".join(r) + " |" for r in rows)

    def name(s: str, work: str) -> str:
        dropped = g(s, work, "replica_dropped")
        if not dropped:
            return s
        return f"{s} (replica dropped in {dropped:.0f} of {g(s, work, 'runs') or 0:.0f} runs)"

    def have(work: str) -> list[str]:
        return [s for s in out.setups if work in out.medians.get(s, {})]

    def cpu(s: str, work: str, spec: str = ".1f", scale: float = 1.0) -> list[str]:
        c = g(s, work, "cpu_us_per_unit")
        return [
            fmt(None if c is None else c * scale, spec),
            fmt(ratio(c, g("haproxy", work, "cpu_us_per_unit")), ".2f"),
        ]

    def user(s: str, work: str, spec: str = ".1f") -> str:
        return fmt(g(s, work, "user_us_per_unit"), spec)

    def rate(s: str, work: str, key: str) -> list[str]:
        v = g(s, work, key)
        return [
            fmt(v),
            fmt(ratio(v, g("haproxy", work, key)), ".2f"),
            fmt(ratio(v, g("direct", work, key)), ".2f"),
        ]

    def machine_cpu(s: str, work: str, scale: float) -> float | None:
        v = g(s, work, "machine_cpu_per_unit")
        return None if v is None else v * scale

    def added(s: str, work: str, key: str) -> str:
        v, d = g(s, work, key), g("direct", work, key)
        return "-" if v is None or d is None or s == "direct" else f"{(v - d) * 1000:+,.0f}"

    section(
        f"Request/response: SET+GET, 50 connections, no pipelining ({p.rr_requests:,} each)",
        ["setup", "req/s", "x HAProxy", "x direct", "proxy CPU us/req", "CPU x HAProxy",
         "of it user us", "p50 ms", "p99 ms", "added p50 us", "added p99 us"],
        [[name(s, "rr"), *rate(s, "rr", "rps"), *cpu(s, "rr"), user(s, "rr"),
          fmt(g(s, "rr", "p50_ms"), ".3f"),
          fmt(g(s, "rr", "p99_ms"), ".3f"), added(s, "rr", "p50_ms"), added(s, "rr", "p99_ms")]
         for s in have("rr")],
    )  # fmt: skip
    section(
        f"Pipelined: SET+GET, 50 connections, -P 16 ({p.p16_requests:,} each)",
        [
            "setup",
            "req/s",
            "x HAProxy",
            "x direct",
            "proxy CPU us/req",
            "CPU x HAProxy",
            "of it user us",
        ],
        [
            [name(s, "p16"), *rate(s, "p16", "rps"), *cpu(s, "p16", ".2f"), user(s, "p16", ".2f")]
            for s in have("p16")
        ],
    )
    section(
        f"Latency without queueing: GET, 1 connection ({p.lat_requests:,})",
        ["setup", "p50 ms", "p99 ms", "added p50 us", "added p99 us"],
        [[name(s, "lat"), fmt(g(s, "lat", "p50_ms"), ".3f"), fmt(g(s, "lat", "p99_ms"), ".3f"),
          added(s, "lat", "p50_ms"), added(s, "lat", "p99_ms")] for s in have("lat")],
    )  # fmt: skip
    section(
        f"Bulk one-way stream ({p.bulk_bytes / (1 << 20):,.0f} MiB, 256 KiB writes, to a sink)",
        ["setup", "MiB/s", "x HAProxy", "x direct", "proxy CPU ms/GiB", "CPU x HAProxy",
         "machine CPU s/GiB", "cores busy"],
        [
            [name(s, "bulk"), *rate(s, "bulk", "mib_s"), *cpu(s, "bulk", ",.0f", 1024 / 1000),
             fmt(machine_cpu(s, "bulk", 1024), ".2f"), fmt(g(s, "bulk", "cores_busy"), ".2f")]
            for s in have("bulk")
        ],
    )  # fmt: skip
    section(
        f"Connection churn: a connection per PING, {CHURN_CLIENTS} at a time "
        f"(redis-benchmark -k 0, {p.churn_connections:,})",
        ["setup", "conn/s", "x HAProxy", "x direct", "p50 ms", "proxy CPU us/conn",
         "CPU x HAProxy", "of it user us"],
        [
            [name(s, "churn"), *rate(s, "churn", "conn_s"), fmt(g(s, "churn", "p50_ms"), ".3f"),
             *cpu(s, "churn", ",.0f"), user(s, "churn", ",.0f")]
            for s in have("churn")
        ],
    )  # fmt: skip

    def mib(s: str, key: str) -> str:
        kib = g(s, "idle", key)
        return fmt(None if kib is None else kib / 1024, ".1f")

    section(
        f"Idle sessions: {p.idle_sessions:,} held open (each used once)",
        ["setup", "RSS before MiB", "RSS after MiB", "KiB per session"],
        [[s, mib(s, "rss_before_kib"), mib(s, "rss_after_kib"),
          fmt(g(s, "idle", "kib_per_session"), ".1f")] for s in have("idle")],
    )  # fmt: skip
    md.extend(protocols.sections(out))
    md.extend(["", "### Targets (reported, never asserted)", ""])
    md.extend(["| target | measured | result |", "|---|---|---|"])
    for t in out.targets:
        unit = " " + t["unit"] if t["unit"] != "x" else "x"
        md.append(f"| {t['target']} | {fmt(t['measured'], '.2f', unit)} | {t['result']} |")
    cost = sync_cost(out)
    if cost:
        md.extend(["", "### Sync mode against async (1 replica; no target)", "", *cost])
    if out.warnings:
        md.extend(["", "### What the proxies logged (warnings; all of it is in the JSON)", ""])
        md.append(
            "A replica that went stale left its sessions, so that run of that setup was "
            "not fully mirrored; the proxy was then restarted with a fresh view."
        )
        md.append("")
        for setup, lines in out.warnings.items():
            md.append(f"- {setup}: {len(lines)} line(s), first: `{lines[0][:200]}`")
    return "\n".join(md).lstrip("\n")


def load_average() -> str:
    """1, 5 and 15 minute load averages: other work on the machine shows here."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def commit_of(path: Path) -> str:
    """The short commit of the checkout at ``path`` ("" without git or outside one)."""
    if shutil.which("git") is None:
        return ""
    return subprocess.run(  # read only: which commit was measured
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, timeout=WAIT, check=False,
    ).stdout.strip()  # fmt: skip


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def first_line(args: list[str]) -> str:
        if shutil.which(args[0]) is None:
            return "not installed"
        done = subprocess.run(args, capture_output=True, text=True, timeout=WAIT, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    from importlib.metadata import version

    commit = commit_of(HERE)
    uvloop = version("uvloop") if importlib.util.find_spec("uvloop") else "not installed"
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": first_line(["haproxy", "-v"]),
        "redis": first_line(["redis-server", "--version"]),
        "redis_benchmark": first_line(["redis-benchmark", "--version"]),
        "uvloop": uvloop,
        "replicaproxy": f"{version('replicaproxy')} (commit {commit or 'unknown'})",
        "load_average_at_start": load_average(),
    }


def header(out: Outcome) -> str:
    m = out.machine
    rounds = f"{out.plan.rounds} round{'s' if out.plan.rounds > 1 else ''}"
    return (
        f"Measured {out.started} UTC ({out.kind} run, {rounds}, medians, {out.seconds:.0f} s) on "
        f"{m['cpus']} x {m['cpu_model']}, Linux {m['kernel']}; Python {m['python']}, "
        f"uvloop {m['uvloop']}; {m['haproxy'].split(' - ')[0]}; {m['redis'].split(' sha=')[0]}; "
        f"replicaproxy {m['replicaproxy']}. Load average at start {m['load_average_at_start']}, "
        f"at end {m.get('load_average_at_end', '?')}."
        + (
            f" Setups marked {BASE} ran from {out.baseline} (commit {out.baseline_commit})."
            if out.baseline
            else ""
        )
        + (
            f" The replica's input was batched on a {out.replica_flush} tick."
            if out.replica_flush
            else ""
        )
    )


COLORS = {"direct": "#999999", "haproxy": "#3465a4", "rp0": "#8ae234", "rp1": "#4e9a06",
          "rp2": "#2e5e04", "rp1sync": "#f57900", "rp1resp": "#75507b",
          "rp1syncresp": "#ad7fa8", "tee0": "#cccccc", "tee1": "#888a85"}  # fmt: skip


def chart(out: Outcome, path: Path) -> None:
    """Bars per setup for the main figures, each labelled with its ratio to HAProxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("rr", "rps", "req/s, 50 conns, no pipelining", 1.0),
        ("p16", "rps", "req/s, 50 conns, -P 16", 1.0),
        ("bulk", "mib_s", "bulk MiB/s", 1.0),
        ("churn", "conn_s", "new connections/s", 1.0),
        ("rr", "cpu_us_per_unit", "proxy CPU us per request (no pipelining)", 1.0),
        ("rr", "p99_ms", "p99 latency ms, 50 conns", 1.0),
        ("lat", "p50_ms", "p50 latency ms, 1 conn", 1.0),
        ("idle", "kib_per_session", "proxy RSS KiB per idle session", 1.0),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    for ax, (work, key, title, scale) in zip(axes.flat, panels, strict=True):
        names = [s for s in out.setups if out.get(s, work, key) is not None]
        values = [(out.get(s, work, key) or 0.0) * scale for s in names]
        # Hatched: a replica was dropped in some run, so the bar is not fully mirrored.
        hatches = ["//" if out.get(s, work, "replica_dropped") else "" for s in names]
        colors = [COLORS[s.removesuffix(BASE)] for s in names]
        bars = ax.bar(names, values, color=colors, hatch=hatches)
        base = out.get("haproxy", work, key)
        if base:
            labels = [f"{v / base:.2f}x" for v in values]
            ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.margins(y=0.15)
        if not names:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(
        f"replicaproxy vs HAProxy and direct ({out.kind}, {out.started} UTC; "
        "labels: ratio to HAProxy; hatched: a replica was dropped in some run)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(path: Path, data: str | bytes) -> None:
    """Write atomically, so a reader never sees half a results file."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)


README_START = "<!-- latest-results:start -->"
README_END = "<!-- latest-results:end -->"


def fill_readme(report: str) -> None:
    """Put a full run's table into bench/README.md between the markers."""
    text = README.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        progress(f"bench: {README} has no {README_START} marker; not updated")
        return
    body = f"{README_START}\n{report}\n{README_END}"
    write(README, text[:start] + body + text[end + len(README_END) :])


def save(out: Outcome, stem: str, report: str) -> list[Path]:
    RESULTS.mkdir(exist_ok=True)
    md, js, png = (RESULTS / f"{stem}.{ext}" for ext in ("md", "json", "png"))
    write(md, report)
    write(js, json.dumps(asdict(out), indent=2) + "\n")
    chart(out, png.with_name(png.name + ".tmp.png"))
    png.with_name(png.name + ".tmp.png").replace(png)
    return [md, js, png]


# ------------------------------------------------------------------ main


def check_requirements(setups: list[str], workloads: list[str], plan: Plan) -> None:
    """Every missing program named at once, with the package that has it."""
    needed = []
    if set(workloads) & REDIS_WORKLOADS:
        needed.append("redis-server")
    if set(workloads) & {"rr", "p16", "lat", "churn"}:
        needed.append("redis-benchmark")
    if "haproxy" in setups:
        needed.append("haproxy")
    missing = [p for p in needed if shutil.which(p) is None]
    if missing:
        pkgs = " ".join(dict.fromkeys(PACKAGES[p] for p in missing))
        raise BenchError(
            f"not installed: {', '.join(missing)}; install with: apt-get install {pkgs} "
            "(all of them: apt-get install haproxy redis-server redis-tools)"
        )
    if importlib.util.find_spec("replicaproxy") is None and set(setups) & set(PROXIES):
        raise BenchError(
            "replicaproxy is not importable by this Python: run with .venv/bin/python "
            "(make bench installs it)"
        )
    if "idle" in workloads:
        # rp1 holds 3 descriptors per session (client, primary, replica); children inherit
        # the soft limit, so raise it to the hard one (no privilege needed).
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = 3 * plan.idle_sessions + 500
        if hard != resource.RLIM_INFINITY and hard < need:
            raise BenchError(
                f"the idle test needs {need} file descriptors, the hard limit is {hard}: "
                "raise it (ulimit -Hn) or leave out idle (--workloads)"
            )
        if soft != resource.RLIM_INFINITY and soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="replicaproxy benchmarks next to HAProxy and a direct connection.",
        epilog="setups: " + ", ".join(SETUPS) + "; workloads: "
        + "; ".join(f"{k} ({v})" for k, v in WORKLOADS.items()),
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="about a minute, small runs")
    parser.add_argument("--rounds", type=int, help="rounds (default: full 5, quick 2)")
    parser.add_argument("--only", default="", help="comma-separated setups, e.g. haproxy,rp1")
    parser.add_argument("--workloads", default="", help="comma-separated, e.g. rr,bulk")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another commit: its replicaproxy runs too, as rp1@base etc.",
    )
    parser.add_argument(
        "--replica-flush",
        metavar="MS",
        default="",
        help="the replica tick of replicaproxy and tee setups, e.g. 5ms (default: 20ms); "
        "the results go to partial.* (compare.* with --baseline)",
    )
    args = parser.parse_args(argv)
    if args.replica_flush and not re.fullmatch(r"\d+(\.\d+)?ms", args.replica_flush):
        parser.error(f"--replica-flush: {args.replica_flush!r} is not milliseconds, e.g. 5ms")
    for opt, known in (("only", SETUPS), ("workloads", tuple(WORKLOADS))):
        chosen = [x for x in getattr(args, opt).split(",") if x]
        bad = [x for x in chosen if x not in known]
        if bad:
            parser.error(f"--{opt}: unknown {', '.join(bad)} (known: {', '.join(known)})")
        setattr(args, opt, [x for x in known if x in chosen] if chosen else list(known))
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds: at least 1")
    if args.baseline is not None:
        if not (args.baseline / "src" / "replicaproxy" / "__init__.py").is_file():
            parser.error(f"--baseline: no src/replicaproxy in {args.baseline}")
        args.only = [x for s in args.only for x in ([s, s + BASE] if s in PROXIES else [s])]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**asdict(plan), "rounds": args.rounds})
    complete = (
        args.only == list(SETUPS) and args.workloads == list(WORKLOADS) and not args.replica_flush
    )
    stem = "partial" if not complete else "quick" if args.quick else "latest"
    out = Outcome("quick" if args.quick else "full", plan, args.only, args.workloads)
    out.replica_flush = args.replica_flush
    if args.baseline is not None:
        stem = "compare"
        out.baseline = str(args.baseline)
        out.baseline_commit = commit_of(args.baseline)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the finally below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    out.started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    try:
        check_requirements(args.only, args.workloads, plan)
        out.machine = machine()
        with tempfile.TemporaryDirectory(prefix="replicaproxy-bench-") as tmp:
            procs = Processes(Path(tmp))
            try:
                run(out, procs)
                protocols.run(out, procs)
            finally:
                procs.close()
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    out.seconds = time.monotonic() - t0
    out.machine["load_average_at_end"] = load_average()
    judge(out)
    protocols.judge(out)
    report = f"{header(out)}\n\n{table(out)}\n"
    paths = save(out, stem, report)
    if stem == "latest":
        fill_readme(report)
    print(report)
    print(f"took {out.seconds:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
