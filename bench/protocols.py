"""What comparing replies as messages costs: each framed protocol against ``bytes``.

Workloads of ``bench/run.py`` (``--workloads http,pg,mc``), each with its own
servers and its own load generator, written in C so that it is faster than the
proxies:

- ``http``: wrk, 50 keep-alive connections, ``GET`` of a 1 KiB file from nginx.
  Setups: ``haproxy`` (``mode tcp``), ``haproxyhttp`` (``mode http``, for
  reference), ``rp1`` (protocol ``bytes``) and ``rp1http`` (protocol ``http``).
- ``pg``: ``pgbench -S`` (select only, simple query protocol), 16 clients, against
  PostgreSQL. Setups ``haproxy``, ``rp1``, ``rp1pg`` (protocol ``postgres``).
- ``mc``: memaslap's get/set mix (9 gets to 1 set, 64-byte keys, 1 KiB values), 50
  connections, against memcached. Setups ``haproxy``, ``rp1``, ``rp1mc``.

``--only`` chooses among ``haproxy`` (with ``haproxyhttp``) and ``rp1`` (with its
framed twin); the other setups do not run these workloads. The target (issue 13):
the framed setup's proxy CPU per request at most 1.2x ``rp1``'s, in the same run.

A workload whose programs are missing is skipped with a message naming them and
their Debian packages; the others still run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import run as bench

#: The framed setup may take this much of ``bytes``'s proxy CPU per request (issue 13).
BOUND = 1.2


@dataclass(frozen=True)
class Workload:
    """One protocol workload: its servers, its load generator, its rows."""

    name: str
    title: str
    protocol: str  # replicaproxy's --protocol of the framed setup
    framed: str  # the framed setup's name
    unit: str  # what a request is called in the table
    #: Programs needed (name: Debian package); alternatives as "a|b".
    needs: dict[str, str]


WORKLOADS = {
    "http": Workload("http", "HTTP: wrk, GET of a 1 KiB file from nginx, 50 keep-alive connections",
                     "http", "rp1http", "req",
                     {"nginx": "nginx-light", "wrk": "wrk", "libfaketime": "libfaketime"}),
    "pg": Workload("pg", "PostgreSQL: pgbench -S (select only), 16 clients", "postgres", "rp1pg",
                   "transaction",
                   {"postgres": "postgresql", "initdb": "postgresql", "pg_ctl": "postgresql",
                    "pgbench": "postgresql-client"}),
    "mc": Workload("mc", "memcached: memaslap, 9 gets to 1 set, 1 KiB values, 50 connections",
                   "memcached", "rp1mc", "request",
                   {"memcached": "memcached", "memaslap|memcaslap": "libmemcached-tools"}),
}  # fmt: skip
#: For bench/run.py's --workloads.
DESCRIPTIONS: dict[str, str] = {w.name: w.title.split(": ", 1)[1] for w in WORKLOADS.values()}
#: The reference setup of the http workload: HAProxy parsing HTTP itself.
HAPROXY_HTTP = "haproxyhttp"

#: How much one run of each setup does. wrk runs for a time; the others for a count.
FULL = {"http_seconds": 5, "pg_transactions": 40_000, "mc_requests": 100_000}
QUICK = {"http_seconds": 2, "pg_transactions": 8_000, "mc_requests": 20_000}
#: Clients: 50 connections as in run.py's rr; PostgreSQL forks a backend per
#: connection (two with a replica), so pgbench opens fewer.
CONNECTIONS = {"http": 50, "pg": 16, "mc": 50}
#: A fixed clock for nginx (libfaketime): its Date header is then the same on every
#: server, so protocol bytes compares equal answers (http ignores Date anyway).
FROZEN = "2026-01-01 00:00:00"
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
#: The file wrk fetches: 1 KiB, with the same mtime on every server (ETag and
#: Last-Modified come from it).
PAGE = b"".join(b"%03d replicaproxy benchmark page%s\n" % (i, b"." * 32) for i in range(16))
PAGE_MTIME = 1_767_225_600  # (FROZEN)


#: What each table needs said next to it.
NOTES = {
    "http": "nginx's clock is frozen (libfaketime), so that its Date header is the same on "
    "every server: byte for byte, protocol bytes would otherwise find the replica's answer "
    "different once a second.",
    "pg": 'rp1 runs with `divergence = "log"`: byte for byte, every PostgreSQL login differs '
    "at BackendKeyData (each backend's pid and key), so rp1 compares nothing after it "
    "(its replica still gets and answers every query), where rp1pg compares every reply.",
    "mc": "",
}


# ------------------------------------------------------------------ programs


def find(name: str) -> str | None:
    """Path of a program: on PATH, in /usr/sbin (nginx), or among PostgreSQL's server
    programs, which Debian keeps off PATH (/usr/lib/postgresql/VERSION/bin)."""
    if name == "libfaketime":
        return str(FAKETIME_LIB) if FAKETIME_LIB.exists() else None
    for alternative in name.split("|"):
        path = shutil.which(alternative) or shutil.which(alternative, path="/usr/sbin")
        if path is None:
            found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{alternative}"))
            path = str(found[-1]) if found else None
        if path is not None:
            return path
    return None


def missing(work: Workload) -> str:
    """What keeps ``work`` from running ("": nothing), with the packages that have it."""
    absent = {name: pkg for name, pkg in work.needs.items() if find(name) is None}
    if work.name == "pg" and os.geteuid() == 0 and find("setpriv") is None:
        absent["setpriv"] = "util-linux"  # PostgreSQL will not run as root
    if not absent:
        return ""
    return (
        f"{', '.join(absent)} not installed "
        f"(apt-get install {' '.join(dict.fromkeys(absent.values()))})"
    )


def as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the postgres user then."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups", "--"]


def version(args: list[str]) -> str:
    """The first line a program prints about its version."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=bench.WAIT, check=False)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


# ------------------------------------------------------------------ servers


def shared_tmp(procs: bench.Processes) -> Path:
    """The run's directory, passable by the servers' own users (nginx's workers run as
    nobody, PostgreSQL as postgres) when the benchmark runs as root."""
    if os.geteuid() == 0:
        procs.tmp.chmod(0o711)
    return procs.tmp


def nginx(procs: bench.Processes, name: str) -> bench.Child:
    """An nginx serving PAGE, one worker, its clock frozen at FROZEN."""
    top = shared_tmp(procs) / name
    root = top / "files"
    root.mkdir(parents=True)
    page = root / "index.html"
    page.write_bytes(PAGE)
    os.utime(page, (PAGE_MTIME, PAGE_MTIME))
    if os.geteuid() == 0:
        top.chmod(0o755)
        root.chmod(0o755)
    port = bench.free_port()
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    conf = top / "nginx.conf"
    conf.write_text(
        f"""{user}
daemon off; master_process on; worker_processes 1; pid {top}/nginx.pid;
error_log stderr warn;
env FAKETIME; env FAKETIME_DONT_FAKE_MONOTONIC;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {top}/body;
    server {{
        listen {bench.HOST}:{port};
        root {root};
        keepalive_requests 10000000;
    }}
}}
"""
    )
    # Only the wall clock: nginx's timers keep real time. libfaketime reads FAKETIME again
    # every 10 s, and nginx clears its environment but for what ``env`` names: so named.
    env = {**os.environ, "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": FROZEN,
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}  # fmt: skip
    binary = find("nginx")
    assert binary is not None
    return procs.start(name, [binary, "-c", str(conf), "-e", "stderr"], port, env=env)


def memcached(procs: bench.Processes, name: str) -> bench.Child:
    """A memcached, one worker thread (as nginx has one worker, HAProxy one thread)."""
    port = bench.free_port()
    binary = find("memcached")
    assert binary is not None
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    args = [binary, "-l", bench.HOST, "-p", str(port), "-U", "0", "-m", "256", "-t", "1", *user]
    return procs.start(name, args, port)


def postgres_template(procs: bench.Processes) -> Path:
    """One PostgreSQL data directory with pgbench's tables (scale 1: 100,000 accounts),
    made once and copied for every server, so that all of them hold the same rows."""
    top = shared_tmp(procs) / "pg"
    top.mkdir()
    if os.geteuid() == 0:
        shutil.chown(top, "postgres", "postgres")
    data = top / "template"
    pg = [*as_postgres(), str(find("pg_ctl")), "-D", str(data)]
    bench.run_tool([*as_postgres(), str(find("initdb")), "-D", str(data), "-A", "trust",
                    "-U", "postgres", "--no-sync", "--no-instructions"], 120)  # fmt: skip
    port = bench.free_port()
    options = f"-p {port} -k {top} -c listen_addresses={bench.HOST} -c fsync=off"
    bench.run_tool([*pg, "-o", options, "-l", str(top / "template.log"), "-w", "start"], 120)
    try:
        bench.run_tool([str(find("pgbench")), "-h", bench.HOST, "-p", str(port), "-U", "postgres",
                        "-i", "-s", "1", "-q", "postgres"], 300)  # fmt: skip
    finally:
        bench.run_tool([*pg, "-m", "fast", "-w", "stop"], 120)
    return data


def postgres(procs: bench.Processes, name: str, template: Path) -> bench.Child:
    """A PostgreSQL server on a copy of ``template``, durability off (as in the tests)."""
    data = template.with_name(name)
    bench.run_tool(["cp", "-a", str(template), str(data)], 120)
    port = bench.free_port()
    args = [*as_postgres(), str(find("postgres")), "-D", str(data), "-p", str(port),
            "-k", str(data.parent), "-c", f"listen_addresses={bench.HOST}", "-c", "fsync=off",
            "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]  # fmt: skip
    return procs.start(name, args, port)


def wait_postgres(child: bench.Child) -> None:
    """Wait for PostgreSQL's own readiness line: it accepts TCP connections before it
    accepts logins ("the database system is starting up")."""
    deadline = time.monotonic() + bench.WAIT
    while "ready to accept connections" not in child.log.read_text(errors="replace"):
        child.check_alive()
        if time.monotonic() > deadline:
            raise bench.BenchError(f"{child.name}: not ready after {bench.WAIT} s\n{child.tail()}")
        time.sleep(0.02)  # the retry interval of a bounded readiness poll


# ------------------------------------------------------------------ setups


def setups(work: Workload, chosen: list[str]) -> list[str]:
    """The setups of ``work`` among those chosen with --only, in table order."""
    rows: list[str] = []
    for setup in chosen:
        if setup == "haproxy":
            rows += ["haproxy", HAPROXY_HTTP] if work.name == "http" else ["haproxy"]
        elif setup.removesuffix(bench.BASE) == "rp1":
            rows += [setup, work.framed + setup.removeprefix("rp1")]
    return rows


def build(procs: bench.Processes, work: Workload, rows: list[str], out: bench.Outcome,
          template: Path | None) -> tuple[dict[str, bench.Target], list[bench.Child]]:  # fmt: skip
    """Start the servers of ``work`` and a proxy for each of its setups (not waited);
    the targets, and the servers."""
    tmp = procs.tmp

    servers: list[bench.Child] = []

    def server(name: str) -> bench.Child:
        if work.name == "http":
            child = nginx(procs, name)
        elif work.name == "pg":
            assert template is not None
            child = postgres(procs, name, template)
        else:
            child = memcached(procs, name)
        servers.append(child)
        return child

    targets = {}
    for setup in rows:
        name = f"{work.name}-{setup}"
        primary = server(f"{name}-primary")
        port = bench.free_port()
        if setup in ("haproxy", HAPROXY_HTTP):
            text = bench.haproxy_config(port, primary.port, bench.HAPROXY_MAXCONN)
            if setup == HAPROXY_HTTP:  # the same, HAProxy reading HTTP (keep-alive both sides)
                text = text.replace("mode tcp", "mode http")
            cfg = tmp / f"{name}.cfg"
            cfg.write_text(text)
            args = [str(find("haproxy")), "-f", str(cfg), "-db"]
            targets[setup] = bench.Target(setup, port, procs.start(name, args, port))
            continue
        protocol = work.protocol if setup.startswith(work.framed) else "bytes"
        replica = server(f"{name}-replica1")
        # replicaproxy's replica_flush and divergence are settings of the file only.
        settings = [f'replica_flush = "{out.replica_flush}"'] if out.replica_flush else []
        if work.name == "pg" and protocol == "bytes":
            # Byte for byte, PostgreSQL's sessions always differ at BackendKeyData (each
            # backend's pid and secret): the replica stays, no longer compared, as with
            # protocol bytes it must. Stale, it would leave every session at its login.
            settings.append('divergence = "log"')
        config: list[str] = []
        if settings:
            path = tmp / f"{name}.toml"
            path.write_text("[proxy]\n" + "".join(f"{x}\n" for x in settings))
            config = ["--config", str(path)]
        env = None
        if setup.endswith(bench.BASE):
            env = {**os.environ, "PYTHONPATH": str(Path(out.baseline) / "src")}
        state = tmp / f"{name}.state.json"
        args = [sys.executable, "-m", "replicaproxy", "run", *config,
                "--listen", f"{bench.HOST}:{port}", "--primary", f"{bench.HOST}:{primary.port}",
                "--replica", f"{bench.HOST}:{replica.port}", "--mode", "async",
                "--state-file", str(state), "--log-level", "warning",
                *(["--protocol", protocol] if protocol != "bytes" else [])]  # fmt: skip
        targets[setup] = bench.Target(setup, port, procs.start(name, args, port, state, env))
    return targets, servers


# ------------------------------------------------------------------ load


def per_request(target: bench.Target, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``bench.measure`` for a run whose count of requests is known only after it
    (``requests`` in its result): the per-unit figures then per request."""
    result = bench.measure(target, 1.0, fn)
    for key in ("cpu_us_per_unit", "user_us_per_unit", "machine_cpu_per_unit"):
        if key in result:
            result[key] /= result["requests"]
    return result


def number(pattern: str, text: str, tool: str) -> float:
    m = re.search(pattern, text)
    if m is None:
        raise bench.BenchError(f"{tool}: no {pattern!r} in its output:\n{text[-1500:]}")
    return float(m[1])


def wrk(port: int, seconds: int) -> dict[str, float]:
    """Requests/s from wrk; any socket error or non-2xx answer is a failed run."""
    args = [str(find("wrk")), "-t", "1", "-c", str(CONNECTIONS["http"]), "-d", f"{seconds}s",
            f"http://{bench.HOST}:{port}/index.html"]  # fmt: skip
    out = bench.run_tool(args, timeout=60 + 2 * seconds)
    if "Non-2xx" in out or "Socket errors" in out:
        raise bench.BenchError(f"wrk got errors or wrong answers:\n{out}")
    requests = number(r"(\d+) requests in", out, "wrk")
    return {"requests": requests, "rps": number(r"Requests/sec:\s+([\d.]+)", out, "wrk")}


def pgbench(port: int, transactions: int) -> dict[str, float]:
    """Transactions/s from ``pgbench -S``; a failed transaction is a failed run."""
    clients = CONNECTIONS["pg"]
    args = [str(find("pgbench")), "-h", bench.HOST, "-p", str(port), "-U", "postgres", "-n", "-S",
            "-c", str(clients), "-j", "1", "-t", str(transactions // clients),
            "dbname=postgres sslmode=disable"]  # fmt: skip
    # 500 transactions/s is far below any setup here; slower means stuck.
    out = bench.run_tool(args, timeout=60 + transactions / 500)
    done = number(r"actually processed: (\d+)/", out, "pgbench")
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if done != transactions or (failed and int(failed[1])):
        raise bench.BenchError(f"pgbench did not complete every transaction:\n{out}")
    return {"requests": done, "rps": number(r"tps = ([\d.]+)", out, "pgbench")}


def memaslap(port: int, requests: int) -> dict[str, float]:
    """Requests/s from memaslap (its default mix: 9 gets to 1 set, 1 KiB values)."""
    args = [str(find("memaslap|memcaslap")), "-s", f"{bench.HOST}:{port}", "-T", "1",
            "-c", str(CONNECTIONS["mc"]), "-x", str(requests)]  # fmt: skip
    out = bench.run_tool(args, timeout=60 + requests / 500)
    done = number(r"Ops: (\d+)", out, "memaslap")
    if done != requests:
        raise bench.BenchError(f"memaslap did {done:.0f} of {requests} requests:\n{out}")
    return {"requests": done, "rps": number(r"TPS: (\d+)", out, "memaslap")}


def load(work: Workload, port: int, size: dict[str, int], warm: bool = False) -> dict[str, float]:
    """One run of ``work``'s load generator against ``port`` (``warm``: a short one)."""
    if work.name == "http":
        return wrk(port, 1 if warm else size["http_seconds"])
    if work.name == "pg":
        return pgbench(port, 1600 if warm else size["pg_transactions"])
    return memaslap(port, 2000 if warm else size["mc_requests"])


# ------------------------------------------------------------------ the run


def run(out: bench.Outcome, procs: bench.Processes) -> None:
    """Run the protocol workloads among ``out.workloads``, ``out.plan.rounds`` rounds,
    each setup in turn within a round; medians into ``out.medians``."""
    chosen = [w for name, w in WORKLOADS.items() if name in out.workloads]
    worlds: dict[str, dict[str, bench.Target]] = {}
    postgres_servers: list[bench.Child] = []
    for work in chosen:
        rows = setups(work, out.setups)
        reason = missing(work)
        if not rows:
            reason = "none of its setups chosen (--only: haproxy, rp1)"
        if reason:
            out.machine[f"skipped_{work.name}"] = reason
            bench.progress(f"bench: workload {work.name} skipped: {reason}")
            continue
        template = postgres_template(procs) if work.name == "pg" else None
        worlds[work.name], servers = build(procs, work, rows, out, template)
        if work.name == "pg":
            postgres_servers = servers
        out.machine.update(versions(work))
    if not worlds:
        return
    bench.progress(f"starting the servers and proxies of {', '.join(worlds)}")
    procs.wait_ready()
    for child in postgres_servers:
        wait_postgres(child)
    size = QUICK if out.kind == "quick" else FULL

    def settle(target: bench.Target, where: str) -> bool:
        """Note what the proxy logged; restart it if a replica went stale (True then)."""
        stale = bench.collect_warnings(out, target, where)
        if stale and target.proxy is not None:
            bench.progress(f"  ! {target.setup}: a replica went stale; restarting it")
            target.proxy.restart()
        return stale

    for name, world in worlds.items():  # warm-up: first connections, code run once
        for target in world.values():
            load(WORKLOADS[name], target.port, size, warm=True)
            settle(target, f"warm-up {name}")
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rnd in range(1, out.plan.rounds + 1):
        for name, world in worlds.items():
            work = WORKLOADS[name]
            for setup, target in world.items():
                sample = per_request(target, partial(load, work, target.port, size))
                if setup.startswith("rp1"):
                    sample["replica_dropped"] = float(settle(target, f"round {rnd} {name}"))
                else:
                    bench.collect_warnings(out, target, f"round {rnd} {name}")
                samples.setdefault(setup, {}).setdefault(name, []).append(sample)
                note = " (a replica was dropped)" if sample.get("replica_dropped") else ""
                bench.progress(
                    f"round {rnd}/{out.plan.rounds} {name:5} {setup:12} {sample['rps']:,.0f} "
                    f"{work.unit}/s, proxy CPU {sample['cpu_us_per_unit']:.1f} us/{work.unit}"
                    f"{note}"
                )
    for world in worlds.values():
        for target in world.values():
            assert target.proxy is not None
            target.proxy.check_alive()
    for setup, works in samples.items():
        for name, runs in works.items():
            out.medians.setdefault(setup, {})[name] = bench.summarize(runs)
            out.samples.setdefault(setup, {})[name] = runs


def versions(work: Workload) -> dict[str, str]:
    """The server's and the load generator's versions, for the report."""
    if work.name == "http":
        return {"nginx": version([str(find("nginx")), "-v"]),
                "wrk": version([str(find("wrk")), "-v"]).split(" [")[0]}  # fmt: skip
    if work.name == "pg":
        return {"postgres": version([str(find("postgres")), "--version"]),
                "pgbench": version([str(find("pgbench")), "--version"])}  # fmt: skip
    return {"memcached": version([str(find("memcached")), "-V"]),
            "memaslap": version([str(find("memaslap|memcaslap")), "-V"])}  # fmt: skip


# ------------------------------------------------------------------ report


def judge(out: bench.Outcome) -> None:
    """One line per protocol in ``out.targets``: framed CPU/request over bytes'."""
    for work in WORKLOADS.values():
        if work.name not in out.workloads:
            continue
        framed = out.get(work.framed, work.name, "cpu_us_per_unit")
        r = bench.ratio(framed, out.get("rp1", work.name, "cpu_us_per_unit"))
        if r is None:
            result = "not measured"
        else:
            result = "PASS" if r <= BOUND else "FAIL"
            dropped = sum(
                out.get(s, work.name, "replica_dropped") or 0 for s in ("rp1", work.framed)
            )
            if dropped:
                result += f" (but a replica was dropped in {dropped:.0f} runs)"
        out.targets.append({
            "target": f"protocol {work.protocol} ({work.name} workload): proxy CPU/request "
                      f"<= {BOUND}x protocol bytes",
            "measured": r, "unit": "x", "bound": BOUND, "result": result,
        })  # fmt: skip


def sections(out: bench.Outcome) -> list[str]:
    """The markdown of the protocol workloads: a table each, for bench/run.py's report."""
    md: list[str] = []
    g, fmt, ratio = out.get, bench.fmt, bench.ratio
    for work in WORKLOADS.values():
        if work.name not in out.workloads:
            continue
        md.extend(["", f"### {work.title}", ""])
        skipped = out.machine.get(f"skipped_{work.name}")
        if skipped:
            md.append(f"Skipped: {skipped}.")
            continue
        rows = [s for s in out.medians if work.name in out.medians[s]]
        rows.sort(key=lambda s: setups(work, out.setups).index(s))
        unit = work.unit if work.unit != "transaction" else "tx"
        md.append(
            f"| setup | {unit}/s | x HAProxy | proxy CPU us/{unit} | CPU x HAProxy "
            "| of it user us | CPU x bytes |"
        )
        md.append("|---|---|---|---|---|---|---|")
        for s in rows:
            cpu = g(s, work.name, "cpu_us_per_unit")
            base = "rp1" + s.removeprefix(work.framed) if s.startswith(work.framed) else s
            dropped = g(s, work.name, "replica_dropped")
            label = s + (f" (replica dropped in {dropped:.0f} runs)" if dropped else "")
            cells = [
                label,
                fmt(g(s, work.name, "rps")),
                fmt(ratio(g(s, work.name, "rps"), g("haproxy", work.name, "rps")), ".2f"),
                fmt(cpu, ".1f"),
                fmt(ratio(cpu, g("haproxy", work.name, "cpu_us_per_unit")), ".2f"),
                fmt(g(s, work.name, "user_us_per_unit"), ".1f"),
                fmt(ratio(cpu, g(base, work.name, "cpu_us_per_unit")), ".2f")
                if s.startswith("rp1")
                else "-",
            ]
            md.append("| " + " | ".join(cells) + " |")
        tools = {"http": ("nginx", "wrk"), "pg": ("postgres", "pgbench"),
                 "mc": ("memcached", "memaslap")}[work.name]  # fmt: skip
        programs = "; ".join(out.machine.get(t, t) for t in tools) + "."
        md.extend(["", f"{programs} {NOTES[work.name]}".rstrip()])
        r = ratio(
            g(work.framed, work.name, "cpu_us_per_unit"), g("rp1", work.name, "cpu_us_per_unit")
        )
        if r is not None:
            verdict = "PASS" if r <= BOUND else "FAIL"
            md.append(
                f"protocol {work.protocol}: {r:.2f}x the proxy CPU per {work.unit} of protocol "
                f"bytes (target <= {BOUND}x): {verdict}."
            )
    return md
