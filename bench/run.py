"""replicaproxy benchmarks: the cost of mirroring, side by side, in one run.

Setups (all on loopback, started here): direct to the server, HAProxy (mode tcp)
forwarding to one server, replicaproxy with 0, 1 and 2 replicas (async) and 1
replica in sync mode. Each round measures every setup in turn (alternating),
several rounds, medians. Figures are ratios to HAProxy and to direct.

Run: ``make bench`` (full) or ``make bench-quick`` (about a minute).
Results: ``bench/results/{latest,quick}.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SETUPS = ["direct", "haproxy", "rp0", "rp1", "rp2", "rp1sync"]
TICK = os.sysconf("SC_CLK_TCK")


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        sys.exit(
            f"bench: {binary} is not installed (apt-get install haproxy redis-server redis-tools)"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Wait until something accepts on ``port`` (bounded; fails if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)  # polling a port that is not up yet: bounded above
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@contextlib.contextmanager
def started(args: list[str], port: int) -> Iterator[Proc]:
    p = Proc(
        subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
    )
    try:
        wait_port(port, p.popen)
        yield p
    finally:
        p.stop()


def redis_server(tmp: Path, port: int) -> list[str]:
    d = tmp / f"redis-{port}"
    d.mkdir()
    return [need("redis-server"), "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(d)]  # fmt: skip


@dataclass
class Setup:
    name: str
    port: int
    pid: int | None  # the proxy's process (None: direct)


@dataclass
class World:
    """Servers and every proxy setup, started once for a whole benchmark."""

    tmp: Path
    kind: str  # "redis" or "sink"
    setups: dict[str, Setup] = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def backend(self) -> int:
        port = free_port()
        if self.kind == "redis":
            self.stack.enter_context(started(redis_server(self.tmp, port), port))
        else:
            args = [sys.executable, str(HERE / "bulk_sink.py"), str(port)]
            self.stack.enter_context(started(args, port))
        return port

    def build(self, names: list[str], conns: int) -> None:
        primary = self.backend()
        self.setups["direct"] = Setup("direct", primary, None)
        if "haproxy" in names:
            port = free_port()
            cfg = self.tmp / f"haproxy-{self.kind}.cfg"
            cfg.write_text(
                f"global\n  maxconn {max(4000, conns * 2)}\n  nbthread 1\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n"
                f"  timeout server 300s\nlisten bench\n  bind {HOST}:{port}\n"
                f"  server s1 {HOST}:{primary}\n"
            )
            p = self.stack.enter_context(started([need("haproxy"), "-f", str(cfg), "-db"], port))
            self.setups["haproxy"] = Setup("haproxy", port, p.popen.pid)
        replicas: list[int] = []
        for name in names:
            m = re.fullmatch(r"rp(\d)(sync)?", name)
            if not m:
                continue
            while len(replicas) < int(m[1]):
                replicas.append(self.backend())
            port = free_port()
            args = [str(HERE.parent / ".venv" / "bin" / "replicaproxy"), "run",
                    "--listen", f"{HOST}:{port}", "--primary", f"{HOST}:{primary}",
                    "--state-file", str(self.tmp / f"{name}-{self.kind}.json"),
                    "--log-level", "warning", "--mode", "sync" if m[2] else "async"]  # fmt: skip
            for r in replicas[: int(m[1])]:
                args += ["--replica", f"{HOST}:{r}"]
            p = self.stack.enter_context(started(args, port))
            self.setups[name] = Setup(name, port, p.popen.pid)


def redis_benchmark(port: int, n: int, conns: int, pipeline: int) -> tuple[float, float, float]:
    """Requests/s, p50 and p99 (ms) of SET+GET through ``port``."""
    out = subprocess.run(
        [need("redis-benchmark"), "-h", HOST, "-p", str(port), "-t", "set,get", "-n", str(n),
         "-c", str(conns), "-P", str(pipeline), "--csv", "-r", "100000"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    rows = [line.replace('"', "").split(",") for line in out.strip().splitlines()[1:]]
    rps = statistics.fmean(float(r[1]) for r in rows)
    p50 = statistics.fmean(float(r[4]) for r in rows)
    p99 = statistics.fmean(float(r[6]) for r in rows)
    return rps, p50, p99


async def _bulk(port: int, total: int) -> float:
    reader, writer = await asyncio.open_connection(HOST, port)
    chunk = b"\0" * (256 * 1024)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        writer.write(chunk)
        sent += len(chunk)
        await writer.drain()
    writer.write_eof()
    answer = await reader.readline()
    elapsed = time.perf_counter() - start
    writer.close()
    assert int(answer.split()[0]) == sent, answer
    return sent / elapsed / (1 << 20)


async def _churn(port: int, count: int, parallel: int) -> float:
    async def one() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"PING\r\n")
        assert await reader.readline() == b"+PONG\r\n"
        writer.close()
        await writer.wait_closed()

    sem = asyncio.Semaphore(parallel)

    async def guarded() -> None:
        async with sem:
            await one()

    start = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(count)))
    return count / (time.perf_counter() - start)


async def _idle(port: int, count: int, pid: int) -> float:
    before = rss_kib(pid)
    conns = []
    for _ in range(count):
        conns.append(await asyncio.open_connection(HOST, port))
    # One round trip through the last one: every earlier session is set up by now.
    reader, writer = conns[-1]
    writer.write(b"PING\r\n")
    await reader.readline()
    after = rss_kib(pid)
    for _, w in conns:
        w.close()
    return (after - before) / count


def measure(fn: object, pid: int | None, requests: int) -> dict[str, float]:
    c0 = cpu_seconds(pid) if pid else 0.0
    result = fn()  # type: ignore[operator]
    c1 = cpu_seconds(pid) if pid else 0.0
    out = dict(result) if isinstance(result, dict) else {"value": float(result)}
    if pid:
        out["cpu_us"] = (c1 - c0) / requests * 1e6
    return out


def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    quick = args.quick
    n = 20000 if quick else 50000
    rounds = args.rounds or (1 if quick else 3)
    bulk_bytes = (64 if quick else 1024) << 20
    churn_n = 1000 if quick else 3000
    idle_n = 1000 if quick else 5000
    names = [s for s in SETUPS if not args.only or s in args.only.split(",")]
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="rp-bench-") as tmpdir:
        tmp = Path(tmpdir)
        redis_world = World(tmp, "redis")
        sink_world = World(tmp, "sink")
        with redis_world.stack, sink_world.stack:
            redis_world.build(names, 50)
            sink_world.build(names, 1)
            for rnd in range(rounds):
                print(f"round {rnd + 1}/{rounds}", file=sys.stderr, flush=True)
                for name in names:
                    s = redis_world.setups[name]
                    row = samples.setdefault(name, {})
                    for label, pipeline in (("rr", 1), ("p16", 16)):

                        def rb(port: int = s.port, p: int = pipeline) -> dict[str, float]:
                            rps, p50, p99 = redis_benchmark(port, n * p // 4 if p > 1 else n, 50, p)
                            return {"rps": rps, "p50": p50, "p99": p99}

                        reqs = 2 * (n * pipeline // 4 if pipeline > 1 else n)
                        row.setdefault(label, []).append(measure(rb, s.pid, reqs))
                    row.setdefault("churn", []).append(
                        measure(
                            lambda port=s.port: asyncio.run(_churn(port, churn_n, 50)),
                            s.pid,
                            churn_n,
                        )
                    )
                    sk = sink_world.setups[name]
                    row.setdefault("bulk", []).append(
                        measure(
                            lambda port=sk.port: asyncio.run(_bulk(port, bulk_bytes)),
                            sk.pid,
                            bulk_bytes // (256 * 1024),
                        )
                    )
            for name in names:
                s = redis_world.setups[name]
                if s.pid and name in ("haproxy", "rp1"):
                    kib = asyncio.run(_idle(s.port, idle_n, s.pid))
                    samples[name]["idle"] = [{"value": kib}]
    med: dict[str, dict[str, dict[str, float]]] = {}
    for name, work in samples.items():
        med[name] = {
            w: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for w, xs in work.items()
        }
    return med


TARGETS = [
    # (label, setup, workload, metric, against, bound, "le" | "ge")
    ("1 replica: CPU/request <= 1.25x HAProxy", "rp1", "rr", "cpu_us", "haproxy", 1.25, "le"),
    ("1 replica: requests/s >= 0.8x HAProxy", "rp1", "rr", "rps", "haproxy", 0.8, "ge"),
    ("0 replicas: CPU/request <= 1.1x HAProxy", "rp0", "rr", "cpu_us", "haproxy", 1.1, "le"),
    ("bulk, 1 replica: MiB/s >= 0.9x direct", "rp1", "bulk", "value", "direct", 0.9, "ge"),
]


def table(med: dict[str, dict[str, dict[str, float]]]) -> str:
    def get(setup: str, work: str, key: str) -> float | None:
        return med.get(setup, {}).get(work, {}).get(key)

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a is not None and b else "-"

    lines = [
        "| setup | req/s | x HAProxy | x direct | CPU us/req | CPU x HAProxy | p50 ms | p99 ms "
        "| req/s -P16 | x HAProxy | bulk MiB/s | x direct | conn/s churn | x HAProxy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in med:
        rps, cpu = get(name, "rr", "rps"), get(name, "rr", "cpu_us")
        p16, bulk, churn = (
            get(name, "p16", "rps"),
            get(name, "bulk", "value"),
            get(name, "churn", "value"),
        )
        lines.append(
            f"| {name} | {rps or 0:,.0f} | {ratio(rps, get('haproxy', 'rr', 'rps'))} "
            f"| {ratio(rps, get('direct', 'rr', 'rps'))} "
            f"| {f'{cpu:.1f}' if cpu else '-'} | {ratio(cpu, get('haproxy', 'rr', 'cpu_us'))} "
            f"| {get(name, 'rr', 'p50') or 0:.3f} | {get(name, 'rr', 'p99') or 0:.3f} "
            f"| {p16 or 0:,.0f} | {ratio(p16, get('haproxy', 'p16', 'rps'))} "
            f"| {bulk or 0:,.0f} | {ratio(bulk, get('direct', 'bulk', 'value'))} "
            f"| {churn or 0:,.0f} | {ratio(churn, get('haproxy', 'churn', 'value'))} |"
        )
    idle = [(n, med[n]["idle"]["value"]) for n in med if "idle" in med[n]]
    if idle:
        lines.append("")
        lines.append("RSS per idle session (KiB): " + ", ".join(f"{n} {v:.1f}" for n, v in idle))
    lines.append("")
    lines.append("| target | measured | result |")
    lines.append("|---|---|---|")
    for label, setup, work, key, against, bound, how in TARGETS:
        a, b = get(setup, work, key), get(against, work, key)
        if a is None or not b:
            lines.append(f"| {label} | - | not measured |")
            continue
        r = a / b
        ok = r <= bound if how == "le" else r >= bound
        lines.append(f"| {label} | {r:.2f}x | {'PASS' if ok else 'FAIL'} |")
    if idle and "rp1" in med and "idle" in med["rp1"]:
        v = med["rp1"]["idle"]["value"]
        lines.append(
            f"| idle, 1 replica: <= 20 KiB RSS per session | {v:.1f} KiB "
            f"| {'PASS' if v <= 20 else 'FAIL'} |"
        )
    sync, async_ = get("rp1sync", "rr", "rps"), get("rp1", "rr", "rps")
    if sync and async_:
        lines.append(
            f"| sync mode cost (no target) | {sync / async_:.2f}x async req/s, p50 "
            f"{get('rp1sync', 'rr', 'p50') or 0:.3f} vs {get('rp1', 'rr', 'p50') or 0:.3f} ms "
            "| report |"
        )
    return "\n".join(lines)


def machine() -> str:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    versions = []
    for cmd in (["haproxy", "-v"], ["redis-server", "--version"]):
        if shutil.which(cmd[0]):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
            versions.append(out.splitlines()[0] if out else cmd[0])
    return (
        f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}; " + "; ".join(versions)
    )


def chart(med: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(med)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (work, key, title) in zip(
        axes,
        [("rr", "rps", "requests/s (SET+GET, -c 50)"), ("rr", "cpu_us", "proxy CPU us/request"),
         ("bulk", "value", "bulk MiB/s")],
        strict=True,
    ):  # fmt: skip
        vals = [med[n].get(work, {}).get(key, 0.0) for n in names]
        ax.bar(names, vals, color=["#888" if n in ("direct", "haproxy") else "#2a6" for n in names])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: small runs")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 3, quick 1)")
    parser.add_argument("--only", default="", help="comma-separated setups, e.g. haproxy,rp1")
    args = parser.parse_args()
    for b in ("haproxy", "redis-server", "redis-benchmark"):
        need(b)
    started_at = time.time()
    med = run(args)
    text = table(med)
    where = machine()
    stem = "quick" if args.quick else "latest"
    RESULTS.mkdir(exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(started_at))
    report = f"Measured {when} UTC on {where}\n\n{text}\n"
    (RESULTS / f"{stem}.md").write_text(report)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"machine": where, "medians": med}, indent=2, sort_keys=True) + "\n"
    )
    chart(med, RESULTS / f"{stem}.png")
    print(report)
    print(f"({time.time() - started_at:.0f} s; saved under {RESULTS})")


if __name__ == "__main__":
    main()
