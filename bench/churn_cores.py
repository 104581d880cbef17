"""Whether a second thread or process would speed up connection churn on this machine.

``python bench/churn_cores.py [--rounds N] [--connections N]`` runs ``bench/run.py``'s
churn workload (``redis-benchmark -k 0``: connect, PING, close, 10 at a time) through:

- ``haproxy``: HAProxy ``mode tcp`` with one thread, as in ``bench/run.py``;
- ``haproxy2``: the same with two threads;
- ``tee0``: ``bench/tee.py`` with no replica, one process;
- ``tee0x2``: two of them sharing the port (``SO_REUSEPORT``);
- ``rp0``: replicaproxy with no replica;
- ``tee1``, ``tee1x2`` and ``rp1``: the same with one replica.

Each setup has Redis servers of its own. The rounds run the setups one after the
other, in reverse order every other round, and the table gives the median of each:
connections/s, their ratio to one-thread HAProxy's, p50 latency, and how many of the
machine's cores were busy (every process: the proxies, the load generator, Redis).

On a machine whose cores the load generator and Redis share with the proxy, a
second thread or process can only help if a core is left idle; where none is, what
a connection costs one core decides the rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import run as bench

SETUPS = ("haproxy", "haproxy2", "tee0", "tee0x2", "rp0", "tee1", "tee1x2", "rp1")
WITH_REPLICA = {"tee1", "tee1x2", "rp1"}


def start(procs: bench.Processes, setup: str) -> bench.Target:
    """The setup's Redis servers and proxy (started, not yet waited for)."""
    tmp = procs.tmp
    redis = bench.redis_server(procs, f"{setup}-redis").port
    replica = [bench.redis_server(procs, f"{setup}-replica").port] if setup in WITH_REPLICA else []
    port = bench.free_port()
    if setup.startswith("haproxy"):
        cfg = tmp / f"{setup}.cfg"
        threads = 2 if setup == "haproxy2" else 1
        cfg.write_text(bench.haproxy_config(port, redis, bench.HAPROXY_MAXCONN, threads))
        proxy = procs.start(setup, [bench.program("haproxy"), "-f", str(cfg), "-db"], port)
    elif setup.startswith("tee"):
        args = [sys.executable, str(bench.TEE), str(port), str(redis), *map(str, replica)]
        args.append("--reuse-port")
        proxy = procs.start(setup, args, port)
        if setup.endswith("x2"):
            procs.start(f"{setup}-second", args, port)
    else:
        proxy = procs.start(
            setup,
            [sys.executable, "-m", "replicaproxy", "run", "--listen", f"{bench.HOST}:{port}",
             "--primary", f"{bench.HOST}:{redis}", "--state-file",
             str(tmp / f"{setup}.state.json"),
             *(f"--replica={bench.HOST}:{r}" for r in replica)],
            port,
        )  # fmt: skip
    return bench.Target(setup, port, proxy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--connections", type=int, default=20_000, help="connections per setup and round"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.connections < 100:
        parser.error("--rounds must be at least 1 and --connections at least 100")
    try:
        import replicaproxy  # noqa: F401
    except ImportError:
        print("churn_cores: run with .venv/bin/python (make install)", file=sys.stderr)
        return 2
    count = args.connections
    samples: dict[str, list[dict[str, float]]] = {s: [] for s in SETUPS}
    with tempfile.TemporaryDirectory(prefix="churn-cores-") as tmp:
        procs = bench.Processes(Path(tmp))
        try:
            targets = {s: start(procs, s) for s in SETUPS}
            procs.wait_ready()
            for round_ in range(args.rounds):
                order = SETUPS if round_ % 2 == 0 else SETUPS[::-1]
                for setup in order:
                    target = targets[setup]
                    bench.churn(target.port, 1_000)  # warm-up
                    sample = bench.measure(target, count, partial(bench.churn, target.port, count))
                    samples[setup].append(sample)
                    bench.progress(
                        f"round {round_ + 1}: {setup} {sample['conn_s']:,.0f} connections/s, "
                        f"{sample['cores_busy']:.2f} cores busy"
                    )
        except bench.BenchError as exc:
            print(f"churn_cores: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.close()
    median = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in samples.items()}
    base = median["haproxy"]["conn_s"]
    print(f"\n{args.rounds} rounds of {args.connections:,} connections, medians\n")
    print("| setup | conn/s | x HAProxy (1 thread) | p50 ms | cores busy |")
    print("|---|---|---|---|---|")
    for setup in SETUPS:
        m = median[setup]
        print(
            f"| {setup} | {m['conn_s']:,.0f} | {m['conn_s'] / base:.2f} | {m['p50_ms']:.3f} "
            f"| {m['cores_busy']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
