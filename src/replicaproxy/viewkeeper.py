"""Keeping the view: load it, change it by compare-and-swap, watch it, adopt it.

A :class:`ViewKeeper` holds the view this proxy acts on and is the only thing that
changes it. It works the same over any :class:`~replicaproxy.store.ViewStore`: the
state file (one proxy) or etcd (several proxies sharing one view).

- **Change** (:meth:`ViewKeeper.change`): the caller gives a *decision*, a function
  from the current view to the next one. The keeper applies it to the newest view it
  knows and swaps the result in only if the store still holds that view's revision.
  If a peer changed the view first, the keeper reads it again and decides again: two
  proxies that see the same failure make one promotion, the second one finds it made.
- **Watch**: every change a peer stores is adopted as it comes (and the epoch never
  goes backwards: an older view is refused with a log line), and the host hears of
  it (:meth:`KeeperHost.view_changed`) so that it can move its sessions.
- **Membership and fencing**: the proxy registers under a lease of ``store_ttl``
  seconds and renews it three times per lease. When no renewal has been
  acknowledged for ``store_ttl`` seconds, counted from when the last good one was
  *sent* (the store cannot have expired the lease before that), the host is told
  (:meth:`KeeperHost.store_lost`); once the store answers again the keeper registers
  anew, reads the view, and tells the host (:meth:`KeeperHost.store_back`).
- **Unclean stops**: the view lists the runs of the proxies that use it. A run that
  is listed but holds no lease any more (it was killed, or cut off for longer than
  its lease) stopped without leaving, and bytes it had accepted may not have reached
  the replicas: every replica becomes stale, by one compare-and-swap, whoever sees
  it first (a peer through its watch, or the next proxy that starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from replicaproxy.core.view import IllegalTransition, View
from replicaproxy.logutil import RateLimited
from replicaproxy.metrics import Metrics
from replicaproxy.store import (
    Change,
    Member,
    Snapshot,
    StateError,
    Stored,
    StoreDown,
    ViewStore,
)

log = logging.getLogger(__name__)

#: Compare-and-swap attempts of one change before it gives up. Each lost attempt
#: means a peer stored a change meanwhile; ten in a row is a storm, not bad luck.
CAS_TRIES = 10
#: Renewals per lease, as etcd's own clients do (TTL / 3): two may be lost before
#: the lease is.
RENEWALS_PER_TTL = 3
#: How long the watch waits before it starts again after it broke. Short: every
#: moment without a watch is a moment a peer's change is not seen.
WATCH_RETRY = 0.2

#: A decision: the next view from the current one (the same object: nothing to do).
Decision = Callable[[View], View]


class KeeperHost(Protocol):
    """What the keeper tells the proxy that uses it (the Server)."""

    def view_changed(
        self, old: View, new: View, *, source: str, why: str, kind: str, backend: str | None
    ) -> None:
        """``new`` is the view now; ``source`` is "local" (this proxy stored it) or "peer"."""
        ...

    def store_lost(self, why: str) -> None:
        """The lease could not be renewed for ``store_ttl``: peers may act without us."""
        ...

    def store_back(self) -> None:
        """Registered again and the view re-read: it is safe to serve again."""
        ...


class ViewKeeper:
    """The view, kept in a :class:`ViewStore` and shared with peers through it."""

    def __init__(
        self,
        store: ViewStore,
        host: KeeperHost,
        metrics: Metrics,
        *,
        ttl: float,
        where: str,
    ) -> None:
        self.store = store
        self.host = host
        self.metrics = metrics
        self.ttl = ttl
        #: How messages name the store: "the state file PATH", "etcd key KEY".
        self.where = where
        self.view: View = View.new("(none)", [])
        self.revision: int | None = None  # the store's revision of self.view
        self.members: dict[str, Member] = {}
        self.up = False
        self.name = ""
        self.run = uuid.uuid4().hex[:12]  # this start of this proxy
        self._info: dict[str, Any] = {}
        self._seen = 0  # store revision the watch has reached
        self._lock = asyncio.Lock()
        self._pending: View | None = None  # being swapped in by change()
        self._owed: set[str] = set()  # stale marks not stored yet (shared stores)
        self._handling: set[str] = set()  # peers whose unclean stop is being stored
        self._marking: set[str] = set()  # stale marks on their way to the store
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._fence: asyncio.TimerHandle | None = None
        self._last_renewal = 0.0
        self._ratelimit = RateLimited()
        self._closing = False

    # --------------------------------------------------------------- reading

    def in_sync(self, name: str) -> bool:
        """Whether ``name`` may be used as an in-sync replica here.

        Not while a stale mark for it is on its way to the store, or owed to it.
        """
        return self.view.in_sync(name) and name not in self._marking and name not in self._owed

    @property
    def marking(self) -> set[str]:
        """Backends whose stale mark is not stored yet (stale here already)."""
        return self._marking | self._owed

    def mark_stale(self, name: str, why: str) -> None:
        """``name`` missed input: stale here at once, and in the store as soon as it can be."""
        if name in self._marking:
            return
        self._marking.add(name)

        def decide(view: View) -> View:
            if name == view.primary or not view.in_sync(name):
                return view
            return view.mark_stale(name)

        async def store() -> None:
            try:
                await self.change(decide, why, kind="stale", backend=name, even_if_unsaved=True)
            finally:
                self._marking.discard(name)

        self._spawn(store(), f"stale-{name}")

    def describe(self) -> dict[str, Any]:
        """The store's part of ``GET /status``."""
        return {
            **self.store.describe(),
            "up": self.up,
            "revision": self.revision,
            "name": self.name,
            "run": self.run,
        }

    # ----------------------------------------------------------------- start

    async def start(
        self,
        decide_first: Callable[[Snapshot], tuple[View, int | None]],
        name: str,
        info: Mapping[str, Any],
        *,
        announce: bool = False,
    ) -> None:
        """Register as ``name``, read the view, fit it (``decide_first``) and store it.

        ``decide_first`` gets what the store holds and returns the view to start from
        and the revision to swap it in at (it logs what it decided). A peer that
        changes the view in between makes the keeper read and decide again.
        Raises StateError (StoreDown when the store cannot be reached). With
        ``announce`` the host hears of the view read (when it had one before).
        """
        self.name = name
        self._info = dict(info)
        self.run = uuid.uuid4().hex[:12]  # a new run each time: the last one's lease is gone
        member = Member(name, self.run, {**self._info, "started": time.time()})
        await self.store.join(member, self.ttl)
        if self.store.shared:  # (a state file has no lease to lose)
            self._renewed(time.monotonic())
        old = self.view
        for _ in range(CAS_TRIES):
            snapshot = await self.store.snapshot()
            view, revision = decide_first(snapshot)
            members = {**snapshot.members, name: member}
            joined = view.with_proxies({**_live_runs(view, members), name: self.run})
            stored = await self.store.swap(revision, joined)
            if stored is not None:
                self.view, self.revision = stored.view, stored.revision
                self.members = members
                self._seen = max(snapshot.revision, stored.revision)
                break
            if not self.store.shared:
                raise StateError(f"{self.where}: changed by someone else while starting")
        else:
            raise StateError(f"{self.where}: changed by peers {CAS_TRIES} times while starting")
        self.up = True
        self.metrics.store_up.set(1)
        self.metrics.proxies.set(len(self.members))
        if announce and _differs(old, self.view):
            self.metrics.view_changes.labels("peer").inc()
            self.host.view_changed(
                old, self.view, source="peer", why="read again after the store came back",
                kind="peer", backend=None,
            )  # fmt: skip
        if self.store.shared:
            if self._watch is None:
                self._watch = self._spawn(self._watching(), "view-watch")
            if self._renewer is None:
                self._renewer = self._spawn(self._renewing(), "lease-renewal")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- change

    async def change(
        self,
        decide: Decision,
        why: str | Callable[[View, View], str],
        *,
        kind: str,
        backend: str | None = None,
        even_if_unsaved: bool = False,
    ) -> bool:
        """Apply ``decide`` to the newest view and store the result by compare-and-swap.

        True when the view is now what ``decide`` wants (stored by us, or already so);
        False (logged) when it could not be stored. ``decide`` may raise
        IllegalTransition, which propagates. With ``even_if_unsaved`` (stale marks,
        where the stricter view is safe) the change holds even when it cannot be
        stored: the file store's view changes in memory as before; a shared store's
        mark is owed, kept locally and stored as soon as the store answers.
        """
        async with self._lock:
            for _ in range(CAS_TRIES):
                current = self.view
                new = decide(current)
                if new is current:
                    return True
                reason = why if isinstance(why, str) else why(current, new)
                problem = ""
                self._pending = new
                try:
                    stored = await self.store.swap(self.revision, new)
                except StateError as exc:  # StoreDown too
                    stored, problem = None, str(exc)
                finally:
                    self._pending = None
                if stored is not None:
                    self._adopt(stored, "local", reason, kind, backend)
                    return True
                if not problem and self.store.shared:
                    # A peer was first: read what it stored, then decide again on that.
                    with contextlib.suppress(StateError):
                        await self._resync()
                    continue
                problem = problem or "the state file was changed by someone else"
                log.error("cannot store view epoch %d (%s): %s", new.epoch, reason, problem)
                if even_if_unsaved:
                    self._keep_unsaved(current, new, reason, kind, backend)
                    return True
                return False
            log.error(
                "cannot store a change to the view (%s): peers changed it %d times in a row",
                why if isinstance(why, str) else kind,
                CAS_TRIES,
            )
            return False

    def _keep_unsaved(self, old: View, new: View, why: str, kind: str, backend: str | None) -> None:
        if not self.store.shared:
            # One proxy, its own file: the stricter view in memory is safe (as ever).
            self.view = new
            self.host.view_changed(old, new, source="local", why=why, kind=kind, backend=backend)
            return
        # Peers go on with the stored view; ours must never run ahead of it (the epoch
        # would go back when we adopt theirs). Keep the marks aside and owe them.
        marked = {n for n in new.backends if old.in_sync(n) and not new.in_sync(n)}
        if marked - self._owed:
            self._owed |= marked
            self._spawn(self._pay_owed(), "owed-stale-marks")

    async def _pay_owed(self) -> None:
        """Store the owed stale marks once the store answers (until the lease is lost)."""
        delay = 0.1
        while self._owed and not self._closing:
            owed = set(self._owed)

            def mark(view: View, owed: set[str] = owed) -> View:
                for n in owed:
                    if n in view.backends and n != view.primary:
                        view = view.mark_stale(n)
                return view

            async with self._lock:
                current = self.view
                new = mark(current)
                try:
                    stored = None if new is current else await self.store.swap(self.revision, new)
                except StateError:
                    stored = None
                if new is current or stored is not None:
                    self._owed -= owed
                    if stored is not None:
                        self._adopt(stored, "local", "stale marks owed since the store failed",
                                    "stale", None)  # fmt: skip
                    return
            with contextlib.suppress(StateError):
                await self._resync()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.ttl / RENEWALS_PER_TTL)

    def _adopt(self, stored: Stored, source: str, why: str, kind: str, backend: str | None) -> bool:
        """Make ``stored`` the view if it is newer; tell the host. False if refused."""
        if self.revision is not None and stored.revision <= self.revision:
            return False
        old = self.view
        if stored.view.epoch < old.epoch:
            self._ratelimit.log(
                log,
                logging.ERROR,
                "backwards",
                "%s holds epoch %d, older than this proxy's %d: refused (the epoch never "
                "goes back; was the store restored from an old backup?)",
                self.where,
                stored.view.epoch,
                old.epoch,
            )
            return False
        self.view, self.revision = stored.view, stored.revision
        self._seen = max(self._seen, stored.revision)
        if _differs(old, stored.view):
            self.metrics.view_changes.labels(source).inc()
            self.host.view_changed(
                old, stored.view, source=source, why=why, kind=kind, backend=backend
            )
        self._check_members()
        return True

    # ----------------------------------------------------------------- watch

    async def _resync(self) -> None:
        """Read the view and the members again (after a lost race or a broken watch)."""
        snapshot = await self.store.snapshot()
        self.members = dict(snapshot.members)
        self.metrics.proxies.set(len(self.members))
        if snapshot.view is not None:
            self._adopt(snapshot.view, "peer", "read from the store", "peer", None)
        self._seen = max(self._seen, snapshot.revision)
        self._check_members()

    async def _watching(self) -> None:
        """Follow the store; on a break, read everything again and follow on."""
        while not self._closing:
            try:
                async for change in self.store.watch(self._seen):
                    self._on_change(change)
            except StoreDown as exc:
                self._ratelimit.log(
                    log, logging.WARNING, "watch", "watching %s: %s", self.where, exc
                )
            except StateError as exc:
                self._ratelimit.log(log, logging.ERROR, "watch", "watching %s: %s", self.where, exc)
            await asyncio.sleep(WATCH_RETRY)
            with contextlib.suppress(StateError):
                await self._resync()

    def _on_change(self, change: Change) -> None:
        if change.view is not None:
            if change.view.view == self._pending:
                return  # our own swap, adopted when its answer comes
            self._adopt(change.view, "peer", "changed by a peer", "peer", None)
        elif change.member is not None:
            self.members[change.member.name] = change.member
            self.metrics.proxies.set(len(self.members))
        elif change.gone is not None:
            self.members.pop(change.gone, None)
            self.metrics.proxies.set(len(self.members))
            self._check_members()

    def _check_members(self) -> None:
        """A peer listed in the view without its lease stopped uncleanly: act on it."""
        if not self.up or not self.store.shared:
            return
        dead = [
            n
            for n in self.view.unclean_runs(_runs(self.members))
            if n != self.name and n not in self._handling
        ]
        if dead:
            self._handling.update(dead)
            self._spawn(self._unclean(dead), "unclean-stop")

    async def _unclean(self, names: list[str]) -> None:
        try:
            await self._mark_unclean(names)
        finally:
            self._handling.difference_update(names)

    async def _mark_unclean(self, names: list[str]) -> None:
        def decide(view: View) -> View:
            dead = [n for n in names if n in view.unclean_runs(_runs(self.members))]
            return view.after_unclean_stop(dead) if dead else view

        who = ", ".join(names)
        log.error(
            "proxy %s stopped without leaving the view (its lease expired): bytes it had "
            "accepted may not have reached the replicas, so every replica is stale until "
            "an operator marks it synced",
            who,
        )
        await self.change(
            decide, f"proxy {who} stopped uncleanly: every replica is stale", kind="stale"
        )

    # ------------------------------------------------------------ the lease

    def _renewed(self, sent: float) -> None:
        """A renewal sent at ``sent`` was acknowledged: the lease lives until sent + ttl."""
        self._last_renewal = sent
        if self._fence is not None:
            self._fence.cancel()
        loop = asyncio.get_running_loop()
        delay = sent + self.ttl - time.monotonic()
        self._fence = loop.call_later(max(0.0, delay), self._lost, "no renewal acknowledged")

    async def _renewing(self) -> None:
        every = self.ttl / RENEWALS_PER_TTL
        while not self._closing:
            await asyncio.sleep(every if self.up else 0)
            if not self.up:
                await self._rejoin(every)
                continue
            sent = time.monotonic()
            try:
                alive = await self.store.renew(within=every)
            except StateError as exc:
                self._ratelimit.log(
                    log, logging.WARNING, "renew", "cannot renew the lease in %s: %s",
                    self.where, exc,
                )  # fmt: skip
                continue
            if alive:
                if self.up:
                    self._renewed(sent)
            else:
                self._lost("the store says the lease expired")

    def _lost(self, why: str) -> None:
        if not self.up or self._closing:
            return
        self.up = False
        self.metrics.store_up.set(0)
        if self._fence is not None:
            self._fence.cancel()
            self._fence = None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None  # started again by the next start()
        since = time.monotonic() - self._last_renewal
        self.host.store_lost(f"{why}: last renewal {since:.1f} s ago (store_ttl {self.ttl:g} s)")

    async def _rejoin(self, every: float) -> None:
        """Register anew (the old lease is gone), read the view, then serve again."""
        while not self._closing:
            try:
                await self.start(self._keep_view, self.name, self._info, announce=True)
            except StateError as exc:
                self._ratelimit.log(
                    log, logging.WARNING, "rejoin", "%s is still unavailable: %s",
                    self.where, exc,
                )  # fmt: skip
                await asyncio.sleep(every)
                continue
            log.warning(
                "%s answers again: registered as %s, view epoch %d (primary %s)",
                self.where,
                self.name,
                self.view.epoch,
                self.view.primary,
            )
            self.host.store_back()
            return

    def _keep_view(self, snapshot: Snapshot) -> tuple[View, int | None]:
        """After a lost lease: the store's view as it is, with our own last run unclean."""
        if snapshot.view is None:
            raise StateError(f"{self.where}: the view is gone from the store")
        stored = snapshot.view
        if stored.view.epoch < self.view.epoch:
            raise StateError(
                f"{self.where} holds epoch {stored.view.epoch}, older than this proxy's "
                f"{self.view.epoch}: refusing to go back"
            )
        view = stored.view
        dead = view.unclean_runs(_runs(snapshot.members))
        if dead:
            log.error(
                "proxies %s (this one's last lease among them, if listed) stopped without "
                "leaving: every replica is stale until an operator marks it synced",
                ", ".join(dead),
            )
            view = view.after_unclean_stop(dead)
        return view, stored.revision

    # ------------------------------------------------------------------ stop

    async def stop(self, *, clean: bool) -> None:
        """Leave: with ``clean``, take this run off the view first (a clean stop)."""
        if self._fence is not None:
            self._fence.cancel()
            self._fence = None
        # Stale marks on their way to the store get there first (they keep a replica
        # that missed input from being promoted); the rest stops now.
        storing = [t for t in self._tasks if t.get_name().startswith(("stale-", "unclean-"))]
        if storing:
            await asyncio.wait(storing, timeout=self.ttl / RENEWALS_PER_TTL)
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if clean and self.up:
            name = self.name

            def leave(view: View) -> View:
                proxies = {n: r for n, r in view.proxies.items() if n != name}
                return view.with_proxies(proxies) if proxies != dict(view.proxies) else view

            try:
                async with asyncio.timeout(self.ttl):
                    await self._leave(leave)
            except (StateError, TimeoutError) as exc:
                log.error("cannot record the clean stop: %s", exc or "no answer in time")
        with contextlib.suppress(StateError, TimeoutError):
            async with asyncio.timeout(self.ttl / RENEWALS_PER_TTL):
                await self.store.leave()
        await self.store.close()

    async def _leave(self, decide: Decision) -> None:
        for _ in range(CAS_TRIES):
            new = decide(self.view)
            if new is self.view:
                return
            stored = await self.store.swap(self.revision, new)
            if stored is not None:
                self.view, self.revision = stored.view, stored.revision
                return
            if not self.store.shared:
                raise StateError(f"{self.where}: changed by someone else")
            await self._resync()
        raise StateError(f"{self.where}: changed by peers {CAS_TRIES} times in a row")


def _differs(a: View, b: View) -> bool:
    """Whether two views differ in what sessions act on (not who runs on them)."""
    return (a.epoch, a.primary, dict(a.backends)) != (b.epoch, b.primary, dict(b.backends))


def _runs(members: Mapping[str, Member]) -> dict[str, str]:
    return {n: m.run for n, m in members.items()}


def _live_runs(view: View, members: Mapping[str, Member]) -> dict[str, str]:
    """The view's proxies that still hold their lease with the same run."""
    runs = _runs(members)
    return {n: r for n, r in view.proxies.items() if runs.get(n) == r}


__all__ = ["Decision", "IllegalTransition", "KeeperHost", "ViewKeeper"]
