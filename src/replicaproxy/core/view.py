"""The replica view: who is primary and which backends have missed nothing.

A :class:`View` is immutable; every change makes a new one with ``epoch + 1``.
The legal moves are the table ``TRANSITIONS`` (after ``h11/_state.py``): a
move not in it raises :class:`IllegalTransition`, so no code path can, say,
promote a stale replica by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

SyncState = Literal["in_sync", "stale"]
IN_SYNC: SyncState = "in_sync"
STALE: SyncState = "stale"

#: (state of a backend, what happens) -> its new state.
TRANSITIONS: Mapping[tuple[SyncState, str], SyncState] = {
    # It missed input: a refused connect, an overflow, a lost connection, a
    # health check that saw it down, or it was the primary and got replaced.
    (IN_SYNC, "mark_stale"): STALE,
    (STALE, "mark_stale"): STALE,
    # The operator copied the primary's state to it (or, later, a journal replay).
    (STALE, "mark_synced"): IN_SYNC,
}


class IllegalTransition(ValueError):
    """A change the view does not allow; the message says why."""


@dataclass(frozen=True, slots=True)
class View:
    """``{epoch, primary, backends: {name: in_sync | stale}}`` (shadows are not in it)."""

    epoch: int
    primary: str
    backends: Mapping[str, SyncState] = field(default_factory=dict)
    #: False while a proxy runs on this view; True after it stopped cleanly.
    clean: bool = True
    #: The proxies running on this view: name -> the id of that run (a new one per
    #: start). A name still here whose run no longer holds its lease in the store
    #: stopped without leaving cleanly (see :meth:`joined`).
    proxies: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.primary not in self.backends:
            raise IllegalTransition(f"primary {self.primary!r} is not one of the backends")
        if self.backends[self.primary] != IN_SYNC:
            raise IllegalTransition(f"primary {self.primary!r} must be in sync")

    @classmethod
    def new(cls, primary: str, replicas: Iterable[str]) -> View:
        """A view for a first start: every replica starts in sync."""
        backends: dict[str, SyncState] = {primary: IN_SYNC}
        backends.update((r, IN_SYNC) for r in replicas)
        return cls(0, primary, backends)

    def state(self, name: str) -> SyncState:
        try:
            return self.backends[name]
        except KeyError:
            raise IllegalTransition(f"{name!r} is not a primary or replica") from None

    def in_sync(self, name: str) -> bool:
        return self.backends.get(name) == IN_SYNC

    def replicas(self) -> list[str]:
        """Every backend but the primary, in the view's order."""
        return [n for n in self.backends if n != self.primary]

    def _move(self, name: str, what: str) -> SyncState:
        state = self.state(name)
        new = TRANSITIONS.get((state, what))
        if new is None:
            raise IllegalTransition(f"cannot {what.replace('_', ' ')} {name!r}: it is {state}")
        return new

    def _next(self, primary: str, backends: Mapping[str, SyncState]) -> View:
        return View(self.epoch + 1, primary, dict(backends), self.clean, dict(self.proxies))

    def mark_stale(self, name: str) -> View:
        """``name`` missed input. The primary cannot be stale: replace it first."""
        if name == self.primary:
            raise IllegalTransition(f"cannot mark {name!r} stale: it is the primary")
        new = self._move(name, "mark_stale")
        if new == self.backends[name]:
            return self  # already stale: nothing changes, no new epoch
        return self._next(self.primary, {**self.backends, name: new})

    def mark_synced(self, name: str) -> View:
        """The operator says ``name`` has the primary's data again."""
        if name == self.primary:
            raise IllegalTransition(f"cannot mark {name!r} synced: it is the primary")
        new = self._move(name, "mark_synced")
        return self._next(self.primary, {**self.backends, name: new})

    def promote(self, name: str, *, old_primary_missed_input: bool) -> View:
        """Make the in-sync replica ``name`` the primary.

        After a failure the old primary missed input (``old_primary_missed_input``)
        and becomes stale; after a planned switchover it stays in sync.
        """
        if name == self.primary:
            raise IllegalTransition(f"{name!r} is already the primary")
        if self.state(name) != IN_SYNC:
            raise IllegalTransition(f"cannot promote {name!r}: it is stale")
        backends = dict(self.backends)
        if old_primary_missed_input:
            backends[self.primary] = self._move(self.primary, "mark_stale")
        return self._next(name, backends)

    def with_clean(self, clean: bool) -> View:
        """The same view with the clean-shutdown flag set (no new epoch)."""
        return View(self.epoch, self.primary, dict(self.backends), clean, dict(self.proxies))

    def with_proxies(self, proxies: Mapping[str, str]) -> View:
        """The same view run by ``proxies`` (no new epoch: who runs is not who is primary).

        ``clean`` follows: a view nobody runs on was left cleanly by the last one.
        """
        return View(self.epoch, self.primary, dict(self.backends), not proxies, dict(proxies))

    def unclean_runs(self, live: Mapping[str, str]) -> list[str]:
        """The proxies of this view that stopped without leaving it, given the ``live`` runs.

        A name whose run id is not the one ``live`` holds (its lease expired, or it
        started again since) died with bytes in flight. A view written by a proxy from
        before the ``proxies`` list says so only with ``clean = false``: that counts too.
        """
        dead = [n for n, run in self.proxies.items() if live.get(n) != run]
        if not self.proxies and not self.clean:
            dead.append("(the last proxy)")
        return dead

    def after_unclean_stop(self, names: list[str]) -> View:
        """``names`` stopped uncleanly: every replica is stale and they leave the list.

        Input they had accepted may never have reached some replicas, so none can be
        trusted (DESIGN.md "Several proxies, one view"). The epoch moves only if a
        replica's state changed.
        """
        view = self
        for r in view.replicas():
            view = view.mark_stale(r)
        proxies = {n: run for n, run in self.proxies.items() if n not in names}
        return view.with_proxies(proxies)

    def reconcile(
        self, primary_in_config: str, configured: Iterable[str], *, reset: Iterable[str] = ()
    ) -> tuple[View, list[str]]:
        """Fit a persisted view to the config's backends; say what changed.

        A backend new to the config starts stale (it has none of the data); one
        gone from the config leaves the view; one in ``reset`` (a new address
        under an old name) is stale too. The view's primary must still be
        configured: the caller reports that as an error.
        """
        reset = set(reset)
        names = list(configured)
        notes: list[str] = []
        if self.primary not in names:
            raise IllegalTransition(
                f"the state file's primary {self.primary!r} is not in the config "
                "(add it back, or start with --reset-state to take the config's primary "
                f"{primary_in_config!r})"
            )
        backends: dict[str, SyncState] = {}
        for n in names:
            if n in reset and n != self.primary:
                backends[n] = STALE
                notes.append(f"{n} has a new address: stale until marked synced")
            elif n in self.backends:
                backends[n] = self.backends[n]
            else:
                backends[n] = STALE
                notes.append(f"{n} is new to the view: stale until marked synced")
        for n in self.backends:
            if n not in backends:
                notes.append(f"{n} is no longer configured: dropped from the view")
        if backends == dict(self.backends):
            return self, notes
        return self._next(self.primary, backends), notes

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "epoch": self.epoch,
            "primary": self.primary,
            "backends": dict(self.backends),
            "clean": self.clean,
        }
        if self.proxies:  # (a view nobody runs on reads as before the list existed)
            data["proxies"] = dict(self.proxies)
        return data

    @classmethod
    def from_json(cls, data: object) -> View:
        """Parse what :meth:`to_json` wrote; ``ValueError`` names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        epoch, primary, backends = data.get("epoch"), data.get("primary"), data.get("backends")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative integer, got {epoch!r}")
        if not isinstance(primary, str):
            raise ValueError(f"primary: expected a string, got {primary!r}")
        if not isinstance(backends, dict) or not all(
            isinstance(k, str) and v in (IN_SYNC, STALE) for k, v in backends.items()
        ):
            raise ValueError("backends: expected an object of name -> 'in_sync' | 'stale'")
        clean = data.get("clean", True)
        if not isinstance(clean, bool):
            raise ValueError(f"clean: expected true or false, got {clean!r}")
        proxies = data.get("proxies", {})
        if not isinstance(proxies, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in proxies.items()
        ):
            raise ValueError("proxies: expected an object of name -> run id")
        try:
            return cls(epoch, primary, dict(backends), clean, dict(proxies))
        except IllegalTransition as exc:
            raise ValueError(str(exc)) from None
