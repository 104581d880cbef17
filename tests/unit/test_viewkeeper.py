"""The view keeper against an in-memory store: compare-and-swap races, adoption, fencing.

The store here behaves as etcd does for what the keeper uses (one revision counter, a
swap that compares the view's revision, watches that see every change in order,
leases that expire); tests/faults/test_cluster.py runs the same against real etcd.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from replicaproxy.core.view import View
from replicaproxy.metrics import Metrics
from replicaproxy.store import Change, Member, Snapshot, Stored, StoreDown
from replicaproxy.viewkeeper import ViewKeeper


class Shared:
    """What every MemoryStore of one test sees: the view, the members, the watchers."""

    def __init__(self) -> None:
        self.revision = 0
        self.view: Stored | None = None
        self.members: dict[str, Member] = {}
        self.watchers: list[asyncio.Queue[Change]] = []
        self.history: list[tuple[int, Change]] = []  # what a watch from a revision replays
        self.down = False
        self.swaps = 0

    def publish(self, change: Change) -> None:
        self.history.append((self.revision, change))
        for q in self.watchers:
            q.put_nowait(change)


class MemoryStore:
    kind = "memory"
    shared = True

    def __init__(self, shared: Shared) -> None:
        self.s = shared
        self.name = ""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "endpoints": []}

    def _check(self) -> None:
        if self.s.down:
            raise StoreDown("unreachable")

    async def snapshot(self) -> Snapshot:
        self._check()
        await asyncio.sleep(0)
        return Snapshot(self.s.view, dict(self.s.members), self.s.revision)

    async def swap(self, revision: int | None, new: View) -> Stored | None:
        self._check()
        await asyncio.sleep(0)  # let the others race
        held = None if self.s.view is None else self.s.view.revision
        if held != revision:
            return None
        self.s.revision += 1
        self.s.swaps += 1
        self.s.view = Stored(new, self.s.revision)
        self.s.publish(Change(view=self.s.view))
        return self.s.view

    async def join(self, member: Member, ttl: float) -> None:
        self._check()
        self.name = member.name
        self.s.revision += 1
        self.s.members[member.name] = member
        self.s.publish(Change(member=member))

    async def renew(self, within: float) -> bool:
        self._check()
        return self.name in self.s.members

    async def leave(self) -> None:
        self.expire()

    def expire(self) -> None:
        if self.s.members.pop(self.name, None) is not None:
            self.s.revision += 1
            self.s.publish(Change(gone=self.name))

    async def watch(self, after: int) -> AsyncIterator[Change]:
        q: asyncio.Queue[Change] = asyncio.Queue()
        for revision, change in self.s.history:
            if revision > after:
                q.put_nowait(change)
        self.s.watchers.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self.s.watchers.remove(q)

    async def close(self) -> None:
        return None


class Host:
    def __init__(self) -> None:
        self.changes: list[tuple[int, str]] = []
        self.lost: list[str] = []
        self.back = 0

    def view_changed(
        self, old: View, new: View, *, source: str, why: str, kind: str, backend: str | None
    ) -> None:
        self.changes.append((new.epoch, source))

    def store_lost(self, why: str) -> None:
        self.lost.append(why)

    def store_back(self) -> None:
        self.back += 1


def first(snapshot: Snapshot) -> tuple[View, int | None]:
    if snapshot.view is None:
        return View.new("a", ["b", "c"]), None
    return snapshot.view.view, snapshot.view.revision


async def keepers(shared: Shared, n: int, ttl: float = 5.0) -> list[tuple[ViewKeeper, Host]]:
    out = []
    for i in range(n):
        host = Host()
        keeper = ViewKeeper(MemoryStore(shared), host, Metrics(), ttl=ttl, where="memory")
        await keeper.start(first, f"p{i}", {})
        out.append((keeper, host))
    return out


async def settle(condition: Any, limit: float = 5.0) -> None:
    """Let the keepers' tasks run until ``condition()`` holds (TimeoutError after ``limit``)."""
    async with asyncio.timeout(limit):
        for _ in iter(condition, True):  # (the watches answer within a few loop turns)
            await asyncio.sleep(0.01)


async def test_three_proxies_failing_over_at_once_bump_the_epoch_once() -> None:
    shared = Shared()
    ks = await keepers(shared, 3)
    try:
        before = shared.view.view.epoch if shared.view else -1

        def failover(view: View) -> View:
            if view.primary != "a":
                return view  # someone was first: nothing left to decide
            return view.promote("b", old_primary_missed_input=True)

        results = await asyncio.gather(
            *(k.change(failover, "a down", kind="failover") for k, _ in ks)
        )
        assert results == [True, True, True]
        await settle(lambda: all(k.view.epoch == before + 1 for k, _ in ks))
        assert shared.view is not None and shared.view.view.epoch == before + 1
        assert [k.view.primary for k, _ in ks] == ["b"] * 3
        sources = sorted(src for _, h in ks for e, src in h.changes if e == before + 1)
        assert sources == ["local", "peer", "peer"]
    finally:
        for k, _ in ks:
            await k.stop(clean=True)


async def test_a_loser_decides_again_on_what_the_winner_stored() -> None:
    shared = Shared()
    ks = await keepers(shared, 2)
    try:
        (k0, _), (k1, _) = ks
        # k0 marks c stale; k1 at the same time promotes c, which must then be refused.
        await asyncio.gather(
            k0.change(lambda v: v.mark_stale("c"), "c missed input", kind="stale"),
            k1.change(
                lambda v: v.promote("c", old_primary_missed_input=True) if v.in_sync("c") else v,
                "promote c",
                kind="failover",
            ),
        )
        assert shared.view is not None
        assert shared.view.view.primary == "a"
        assert shared.view.view.backends["c"] == "stale"
    finally:
        for k, _ in ks:
            await k.stop(clean=True)


async def test_an_older_epoch_is_never_adopted() -> None:
    shared = Shared()
    ks = await keepers(shared, 1)
    k, _ = ks[0]
    try:
        await k.change(lambda v: v.mark_stale("b"), "b stale", kind="stale")
        epoch = k.view.epoch
        assert shared.view is not None
        old = View(epoch - 1, "a", {"a": "in_sync", "b": "in_sync", "c": "in_sync"})
        shared.revision += 1
        shared.view = Stored(old, shared.revision)
        shared.publish(Change(view=shared.view))
        await asyncio.sleep(0.05)
        assert k.view.epoch == epoch and k.view.backends["b"] == "stale"
    finally:
        await k.stop(clean=True)


async def test_a_peer_whose_lease_expired_makes_every_replica_stale_once() -> None:
    shared = Shared()
    ks = await keepers(shared, 3)
    try:
        epoch = ks[0][0].view.epoch
        victim = ks[2][0]
        victim.store.expire()  # type: ignore[attr-defined]
        await victim.stop(clean=False)
        await settle(lambda: all(k.view.backends["b"] == "stale" for k, _ in ks[:2]))
        assert ks[0][0].view.epoch == epoch + 2  # b and c: one mark each, one swap
        assert "p2" not in ks[0][0].view.proxies
        await asyncio.sleep(0.05)
        assert ks[0][0].view.epoch == epoch + 2, "the second peer found it done"
    finally:
        for k, _ in ks[:2]:
            await k.stop(clean=True)


async def test_a_lease_not_renewed_for_the_ttl_fences_then_rejoins() -> None:
    shared = Shared()
    ks = await keepers(shared, 2, ttl=1.0)
    (k0, h0), (k1, _) = ks
    try:
        shared.down = True  # nobody reaches the store
        loop = asyncio.get_running_loop()
        began = loop.time()
        await settle(lambda: bool(h0.lost), limit=3.0)
        assert loop.time() - began <= 1.0 + 0.2, "lost within the ttl of the last renewal"
        assert not k0.up
        k1.store.expire()  # type: ignore[attr-defined]
        k0.store.expire()  # type: ignore[attr-defined]
        shared.down = False
        await settle(lambda: h0.back == 1, limit=3.0)
        assert k0.up
        # Its own last run (and k1's) left no clean stop: every replica is stale.
        assert k0.view.backends["b"] == "stale" and k0.view.backends["c"] == "stale"
        assert len(h0.lost) == 1, "said once"
    finally:
        for k, _ in ks:
            await k.stop(clean=True)
