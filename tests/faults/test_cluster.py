"""Faults: several proxies sharing one view in a real etcd cluster on loopback.

Each test starts its own etcd (three members, or one where the test restarts it),
redis servers and proxies, every proxy with ``store_ttl = 2s`` to keep the tests short,
and kills them all afterwards. They print ``MEASURED ...`` lines (docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support import (
    HOST,
    WAIT,
    Etcd,
    NetNs,
    Proxy,
    admin_get,
    admin_post,
    assert_no_crash,
    connect,
    etcd_cluster,
    log_time,
    netns,
    percentile,
    redis,
    redis_cli,
    replicaproxy,
    require_binary,
    running,
    start_etcd_node,
    wait_until,
)

TTL = 2.0
HEALTH = 'interval = 0.2\ntimeout = 0.3\nfall = 2\nrise = 1\nsend = "PING\\r\\n"\nexpect = "+PONG"'


def cluster_config(
    tmp: Path,
    name: str,
    url: str,
    backends: list[tuple[str, str, str]],
    *,
    listen: str = f"{HOST}:0",
    admin: str = f"{HOST}:0",
    extra: str = "",
) -> str:
    """A config file for one proxy of a shared view (the same backends for every proxy)."""
    lines = [
        "[proxy]",
        f'listen = "{listen}"',
        f'view_store = "{url}"',
        f'name = "{name}"',
        f'store_ttl = "{TTL}s"',
        extra,
        "[admin]",
        f'listen = "{admin}"',
        *(['token = "t"'] if not admin.startswith("127.") else []),
        "[health]",
        HEALTH,
    ]
    for backend, address, role in backends:
        lines += ["[[backend]]", f'name = "{backend}"', f'address = "{address}"',
                  f'role = "{role}"']  # fmt: skip
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@contextlib.contextmanager
def proxies(
    tmp: Path, url: str, backends: list[tuple[str, str, str]], count: int
) -> Iterator[list[Proxy]]:
    """``count`` proxies on loopback sharing the view at ``url``."""
    with contextlib.ExitStack() as stack:
        started = []
        for i in range(count):
            config = cluster_config(tmp, f"px{i}", url, backends)
            proc = stack.enter_context(running(replicaproxy("run", "--config", config),
                                               name=f"px{i}"))  # fmt: skip
            admin = proc.wait_for(r"admin API on http://([\d.]+:\d+)")[1]
            port = int(proc.wait_for(r"listening on [\d.]+:(\d+)")[1])
            started.append(Proxy(proc, port, admin))
        for p in started:  # each sees every peer before the test begins
            wait_until(f"{p.proc.name} sees {count} proxies", lambda p=p: members(p) == count)
        yield started


def members(p: Proxy) -> int:
    return len(admin_get(p.admin, "/status")["proxies"])


def view_of(p: Proxy) -> tuple[int, str, dict[str, str]]:
    status = admin_get(p.admin, "/status")
    return status["epoch"], status["primary"], {b["name"]: b["state"] for b in status["backends"]}


def setters(port: int, stop: threading.Event, tag: str, acked: list[int]) -> None:
    """Sequential SETs through one proxy until ``stop``; the acknowledged ones in ``acked``."""
    i = 0
    with contextlib.suppress(OSError), connect(port) as s, s.makefile("rb") as replies:
        while not stop.is_set() and i < 100_000:
            s.sendall(b"SET %s:%d v\r\n" % (tag.encode(), i))
            if replies.readline() != b"+OK\r\n":
                return
            acked.append(i)
            i += 1


def test_primary_killed_under_load_three_proxies_one_epoch_bump(tmp_path: Path) -> None:
    """kill -9 of the primary with three proxies writing: one promotion, agreed within 1 s."""
    for d in ("r1", "r2", "etcd"):
        (tmp_path / d).mkdir()
    with (
        etcd_cluster(tmp_path / "etcd", 3) as etcd,
        redis(tmp_path / "r1", "r1") as (r1, p1),
        redis(tmp_path / "r2", "r2") as (_, p2),
    ):
        backends = [("r1", f"{HOST}:{p1}", "primary"), ("r2", f"{HOST}:{p2}", "replica")]
        with proxies(tmp_path, etcd.url("kill"), backends, 3) as pxs:
            stop = threading.Event()
            acked: list[list[int]] = [[] for _ in pxs]
            threads = [
                threading.Thread(target=setters, args=(p.port, stop, f"c{i}", acked[i]))
                for i, p in enumerate(pxs)
            ]
            for t in threads:
                t.start()
            try:
                wait_until("every client wrote 200 keys", lambda: all(len(a) > 200 for a in acked))
                killed = time.time()
                r1.signal(9)
                for p in pxs:
                    p.proc.wait_for(r"view epoch 1\b")
                wait_until("every client went on after the kill",
                           lambda: all(len(a) > 400 for a in acked))  # fmt: skip
            finally:
                stop.set()
                for t in threads:
                    t.join(WAIT)
            views = [view_of(p) for p in pxs]
            assert views == [(1, "r2", {"r1": "stale", "r2": "in_sync"})] * 3, views
            changed = [
                float(p.proc.count(r"WARNING replicaproxy.server: view epoch 1: ")) for p in pxs
            ]
            assert sum(changed) == 1, f"exactly one proxy stored epoch 1: {changed}"
            assert not any(p.proc.count(r"view epoch 2") for p in pxs), "one epoch bump only"
            times = [log_time(p.proc.wait_for(r".*view epoch 1(:| adopted)")[0]) for p in pxs]
            spread = max(times) - min(times)
            assert spread < 1.0, f"the proxies agreed {spread:.3f} s apart"
            for i, a in enumerate(acked):  # every acknowledged write is on the new primary
                last = a[-1]
                assert redis_cli(p2, "GET", f"c{i}:{last}") == "v"
            for p in pxs:
                assert_no_crash(p.proc)
            print(
                f"\nMEASURED 3 proxies, primary SIGKILLed under load: epoch bumps 1, agreed "
                f"{spread * 1000:.0f} ms apart, first {min(times) - killed:.2f} s after the "
                f"kill; {sum(len(a) for a in acked)} acknowledged SETs"
            )


def test_adoption_p99_and_a_race_of_concurrent_promotions(tmp_path: Path) -> None:
    """Peers adopt a change within 1 s (p99); three proxies promoting at once bump once."""
    (tmp_path / "etcd").mkdir()
    with (
        etcd_cluster(tmp_path / "etcd", 3) as etcd,
        redis(tmp_path, "r1") as (_, p1),
        redis(tmp_path, "r2") as (_, p2),
    ):
        backends = [("r1", f"{HOST}:{p1}", "primary"), ("r2", f"{HOST}:{p2}", "replica")]
        with proxies(tmp_path, etcd.url("race"), backends, 3) as pxs:
            lags: list[float] = []
            bumps: list[int] = []
            target = "r2"
            for round_ in range(20):
                epoch = view_of(pxs[0])[0]
                with ThreadPoolExecutor(3) as pool:
                    answers = list(pool.map(
                        lambda p, t=target: admin_post(p.admin, f"/backends/{t}/promote")[0], pxs
                    ))  # fmt: skip
                assert sorted(answers).count(200) >= 1, answers
                assert all(a in (200, 409) for a in answers), answers
                for p in pxs:
                    wait_until(f"round {round_}: {p.proc.name} has {target} primary",
                               lambda p=p, t=target: view_of(p)[1] == t)  # fmt: skip
                new = [view_of(p)[0] for p in pxs]
                assert len(set(new)) == 1, new
                bumps.append(new[0] - epoch)
                switched = rf"view epoch {new[0]}: switchover"
                # (the log is written a batch at a time: the line may follow the view)
                wait_until(f"round {round_}: the switchover logged",
                           lambda s=switched: any(p.proc.count(s) for p in pxs))  # fmt: skip
                stored = [p for p in pxs if p.proc.count(switched)]
                assert len(stored) == 1, f"round {round_}: stored by {len(stored)} proxies"
                at = log_time(stored[0].proc.wait_for(rf".*view epoch {new[0]}: switchover")[0])
                for p in pxs:
                    if p is not stored[0]:
                        line = p.proc.wait_for(rf".*view epoch {new[0]} adopted")[0]
                        lags.append(log_time(line) - at)
                target = "r1" if target == "r2" else "r2"
            assert bumps == [1] * len(bumps), f"epoch bumps per race: {bumps}"
            p99 = percentile(lags, 0.99)
            assert p99 < 1.0, f"adoption p99 {p99:.3f} s"
            print(
                f"\nMEASURED adoption by peers: {len(lags)} samples, p50 "
                f"{percentile(lags, 0.5) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
                f"{max(lags) * 1000:.1f} ms; {len(bumps)} races of 3 concurrent promotions: "
                f"epoch bumps {sorted(set(bumps))} per race"
            )


def test_a_killed_proxy_makes_the_replicas_stale_and_peers_serve_on(tmp_path: Path) -> None:
    (tmp_path / "etcd").mkdir()
    with (
        etcd_cluster(tmp_path / "etcd", 3) as etcd,
        redis(tmp_path, "r1") as (_, p1),
        redis(tmp_path, "r2") as (_, p2),
    ):
        backends = [("r1", f"{HOST}:{p1}", "primary"), ("r2", f"{HOST}:{p2}", "replica")]
        with proxies(tmp_path, etcd.url("killproxy"), backends, 3) as pxs:
            with connect(pxs[1].port) as held, held.makefile("rb") as replies:
                held.sendall(b"SET before 1\r\n")
                assert replies.readline() == b"+OK\r\n"
                killed = time.monotonic()
                pxs[0].proc.signal(9)
                pxs[1].proc.wait_for(r"proxy px0 stopped without leaving", timeout=TTL + WAIT)
                seen = time.monotonic() - killed
                for p in pxs[1:]:
                    wait_until(f"{p.proc.name}: r2 stale",
                               lambda p=p: view_of(p)[2]["r2"] == "stale")  # fmt: skip
                # The replica left the session that was open: the session goes on.
                pxs[1].proc.wait_for(r"r2 left the session: stale in the view")
                held.sendall(b"SET after 1\r\n")
                assert replies.readline() == b"+OK\r\n"
            assert redis_cli(pxs[2].port, "GET", "after") == "1"
            assert view_of(pxs[2])[:2] == (1, "r1")
            assert [p["name"] for p in admin_get(pxs[2].admin, "/status")["proxies"]] == [
                "px1",
                "px2",
            ]
            print(
                f"\nMEASURED proxy SIGKILLed: peers made the replica stale {seen:.2f} s "
                f"after the kill (store_ttl {TTL:g} s) and served on"
            )


def test_etcd_restarted_fences_then_every_proxy_serves_again(tmp_path: Path) -> None:
    binary = require_binary("etcd")
    from support import free_port

    client, peer = free_port(), free_port()
    name = "rpsolo"
    cluster = f"{name}=http://{HOST}:{peer}"
    node = start_etcd_node(binary, name, tmp_path, [f"{HOST}:{client}"], f"{HOST}:{peer}",
                           cluster)  # fmt: skip
    try:
        with redis(tmp_path, "r1") as (_, p1), redis(tmp_path, "r2") as (_, p2):
            backends = [("r1", f"{HOST}:{p1}", "primary"), ("r2", f"{HOST}:{p2}", "replica")]
            etcd = Etcd([node], [f"{HOST}:{client}"], tmp_path)
            with proxies(tmp_path, etcd.url("restart"), backends, 2) as pxs:
                assert redis_cli(pxs[0].port, "SET", "k", "1") == "OK"
                node.stop()
                stopped = time.monotonic()
                for p in pxs:
                    p.proc.wait_for(r"lost the view store .*stopped accepting", timeout=TTL + WAIT)
                fenced = time.monotonic() - stopped
                assert fenced < TTL + 1.0, f"fenced {fenced:.2f} s after etcd stopped"
                for p in pxs:
                    with contextlib.suppress(OSError), connect(p.port, timeout=1.0) as s:
                        s.sendall(b"PING\r\n")
                        raise AssertionError(f"{p.proc.name} still accepts while fenced")
                node = start_etcd_node(binary, name, tmp_path, [f"{HOST}:{client}"],
                                       f"{HOST}:{peer}", cluster)  # fmt: skip
                for p in pxs:
                    p.proc.wait_for(r"accepting clients again", timeout=TTL + WAIT)
                back = time.monotonic() - stopped
                assert redis_cli(pxs[1].port, "GET", "k") == "1"
                # Both leases expired: an unclean stop each, so the replica is stale.
                assert view_of(pxs[0])[2] == {"r1": "in_sync", "r2": "stale"}
                assert view_of(pxs[1])[2] == {"r1": "in_sync", "r2": "stale"}
                for p in pxs:
                    assert p.proc.count(r"lost the view store") == 1, "said once"
                    assert_no_crash(p.proc)
                print(
                    f"\nMEASURED etcd stopped: both proxies fenced {fenced:.2f} s after "
                    f"(store_ttl {TTL:g} s); serving again {back:.2f} s after the stop"
                )
    finally:
        node.stop()


def test_a_proxy_partitioned_from_etcd_stops_and_the_others_carry_on(tmp_path: Path) -> None:
    """One proxy in a namespace loses its link to etcd (only): it stops within ttl + 1 s.

    The namespace has two veth pairs to the root namespace: one carries its clients, its
    admin API and (through relays) the redis servers; the other carries etcd only, and
    is the one set down.
    """
    with netns("data") as ns, etcd_link(ns) as (etcd_host, etcd_dev):
        (tmp_path / "etcd").mkdir()
        with (
            etcd_cluster(tmp_path / "etcd", 3, extra_host=etcd_host) as etcd,
            redis(tmp_path, "r1") as (_, p1),
            redis(tmp_path, "r2") as (_, p2),
        ):
            backends = [("r1", f"{HOST}:{p1}", "primary"), ("r2", f"{HOST}:{p2}", "replica")]
            url = etcd.url("partition")
            with (
                proxies(tmp_path, url, backends, 2) as pxs,
                isolated(tmp_path, ns, etcd, etcd_host, p1, p2) as cut,
            ):
                wait_until("the peers see the isolated proxy", lambda: members(pxs[0]) == 3)
                with (
                    connect_to(cut.admin.rsplit(":", 1)[0], cut.port) as s,
                    s.makefile("rb") as replies,
                ):
                    s.sendall(b"SET iso 1\r\n")
                    assert replies.readline() == b"+OK\r\n"
                    ns.run("ip", "link", "set", etcd_dev, "down")
                    parted = time.monotonic()
                    cut.proc.wait_for(r"lost the view store .*stopped accepting",
                                      timeout=TTL + WAIT)  # fmt: skip
                    fenced = time.monotonic() - parted
                    # Its session ended: no session of it writes on past the fence.
                    assert replies.readline() == b""
                assert fenced < TTL + 1.0, f"stopped {fenced:.2f} s after the partition"
                # The others carry on, one view, one primary; the isolated proxy's lease
                # expired without a clean leave, so the replica is stale. The peers log
                # that before the stale view is stored, and learn it through their watch.
                pxs[0].proc.wait_for(r"proxy iso stopped without leaving", timeout=WAIT)
                stale = (1, "r1", {"r1": "in_sync", "r2": "stale"})
                for p in pxs:
                    wait_until(f"{p.proc.name} holds the stale view",
                               lambda p=p: view_of(p) == stale)  # fmt: skip
                    assert redis_cli(p.port, "SET", "k", p.proc.name) == "OK"
                    assert view_of(p) == stale
                ns.run("ip", "link", "set", etcd_dev, "up")
                cut.proc.wait_for(r"accepting clients again", timeout=WAIT)
                assert view_of(cut)[:2] == (1, "r1")
                for p in [*pxs, cut]:
                    assert p.proc.count(r"promoted=|takeovers=") == 0, "one primary throughout"
                    assert_no_crash(p.proc)
                print(
                    f"\nMEASURED proxy partitioned from etcd: stopped serving {fenced:.2f} s "
                    f"after the cut (store_ttl {TTL:g} s); peers went on with primary r1"
                )


def connect_to(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=WAIT)


@contextlib.contextmanager
def etcd_link(ns: NetNs) -> Iterator[tuple[str, str]]:
    """A second veth pair into ``ns``, for etcd only: (root side's address, ns side's device)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    subnet = next(s for s in range(255, 0, -1) if f"10.200.{s}." not in used)
    host_dev, ns_dev = ns.host_dev + "e", ns.ns_dev + "e"
    host_ip, ns_ip = f"10.200.{subnet}.1", f"10.200.{subnet}.2"
    try:
        for cmd in (
            ["ip", "link", "add", host_dev, "type", "veth", "peer", "name", ns_dev],
            ["ip", "link", "set", ns_dev, "netns", ns.name],
            ["ip", "addr", "add", f"{host_ip}/30", "dev", host_dev],
            ["ip", "link", "set", host_dev, "up"],
            ns.exec("ip", "addr", "add", f"{ns_ip}/30", "dev", ns_dev),
            ns.exec("ip", "link", "set", ns_dev, "up"),
        ):
            subprocess.run(cmd, check=True, capture_output=True, timeout=WAIT)
        yield host_ip, ns_dev
    finally:
        subprocess.run(["ip", "link", "del", host_dev], capture_output=True, timeout=WAIT)


@contextlib.contextmanager
def isolated(tmp: Path, ns: NetNs, etcd: Etcd, etcd_host: str, p1: int, p2: int) -> Iterator[Proxy]:
    """A proxy inside ``ns``: etcd over the etcd pair, the redis servers through relays."""
    relays = [_relay(tmp, ns.host_ip, port) for port in (p1, p2)]
    with contextlib.ExitStack() as stack:
        for args, listen in relays:
            stack.enter_context(running(args, name=f"relay:{listen}")).wait_for("relay listening")
        backends = [("r1", f"{ns.host_ip}:{relays[0][1]}", "primary"),
                    ("r2", f"{ns.host_ip}:{relays[1][1]}", "replica")]  # fmt: skip
        endpoints = [f"{etcd_host}:{e.rsplit(':', 1)[1]}" for e in etcd.endpoints]
        config = cluster_config(tmp, "iso", etcd.url("partition", endpoints), backends,
                                listen=f"{ns.ns_ip}:6380", admin=f"{ns.ns_ip}:9901")  # fmt: skip
        proc = stack.enter_context(running(ns.exec(*replicaproxy("run", "--config", config)),
                                           name="iso"))  # fmt: skip
        proc.wait_for(r"listening on")
        yield Proxy(proc, 6380, f"{ns.ns_ip}:9901")


def _relay(tmp: Path, host: str, port: int) -> tuple[list[str], int]:
    """A TCP relay from ``host:free port`` to 127.0.0.1:``port`` (redis, for the namespace)."""
    from support import free_port

    listen = free_port()
    script = tmp / f"relay{port}.py"
    script.write_text(RELAY)
    return [sys.executable, str(script), host, str(listen), str(port)], listen


RELAY = """
import asyncio, sys
host, listen, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()
async def handle(r, w):
    ur, uw = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)
async def main():
    server = await asyncio.start_server(handle, host, listen)
    print("relay listening", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""
