"""Where the view is kept: one interface, a file or etcd behind it.

:class:`ViewStore` is what :mod:`replicaproxy.viewkeeper` uses: load the view with
its revision, swap it for a new one only if the revision is still the one read
(compare-and-swap), watch what peers change, and hold this proxy's membership. Two
implementations: :class:`FileViewStore` (one proxy, the view in a JSON file; the
default) and :class:`~replicaproxy.etcd.EtcdViewStore` (several proxies, the view in
etcd). :func:`open_store` picks one by URL: ``file:PATH`` or
``etcd://HOST:PORT[,HOST:PORT...]/PREFIX``.

:class:`FileStateStore` is the file itself, replaced atomically: temp file, fsync,
rename, fsync of the folder, so a crash leaves either the old view or the new one,
never half.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from replicaproxy.core.view import View


class StateError(Exception):
    """The stored view cannot be read or written; the message says where and why."""


class StoreDown(StateError):
    """The store could not be reached or did not answer in time (it may be fine later)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A view as read from a store, with the revision a swap must name to replace it."""

    view: View
    revision: int


@dataclass(frozen=True, slots=True)
class Member:
    """A proxy registered in the store: its run id and what it says about itself."""

    name: str
    run: str
    info: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The member as ``GET /status`` and ``ctl status`` list it."""
        return {
            "name": self.name,
            "run": self.run,
            **{k: self.info.get(k) for k in ("listen", "admin", "version", "started")},
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The view (None: nothing stored yet) and the live proxies at store revision ``revision``."""

    view: Stored | None
    members: Mapping[str, Member]
    revision: int


@dataclass(frozen=True, slots=True)
class Change:
    """What a watch saw: a new view, or a proxy that came (``member``) or went (``gone``)."""

    view: Stored | None = None
    member: Member | None = None
    gone: str | None = None


class ViewStore(Protocol):
    """Keeps one view for every proxy that shares it, and who those proxies are.

    Every method that talks to a network store may raise :class:`StoreDown`;
    a store that answers something it should not raises :class:`StateError`.
    """

    #: "file" or "etcd".
    kind: str
    #: Whether other proxies may share this view (the file store: no).
    shared: bool

    def describe(self) -> dict[str, Any]:
        """``{"kind", "endpoints": [...], "prefix" or "path"}`` for status and logs."""
        ...

    async def snapshot(self) -> Snapshot:
        """The stored view and the live proxies, as of one store revision."""
        ...

    async def swap(self, revision: int | None, new: View) -> Stored | None:
        """Store ``new`` if the view's revision is still ``revision`` (None: nothing stored).

        Returns the stored view and its new revision, or None when someone else
        changed the view first (nothing was stored).
        """
        ...

    async def join(self, member: Member, ttl: float) -> None:
        """Register this proxy under a lease of ``ttl`` seconds (a new lease each call)."""
        ...

    async def renew(self, within: float) -> bool:
        """Keep the lease alive; False when it is gone (expired) and must be taken again."""
        ...

    async def leave(self) -> None:
        """Give the lease up, so the registration goes at once."""
        ...

    def watch(self, after: int) -> AsyncIterator[Change]:
        """Changes after store revision ``after``, as they happen.

        Ends (or raises StoreDown) when the store is lost; the caller loads again.
        """
        ...

    async def close(self) -> None:
        """Let go of connections."""
        ...


class StateStore(Protocol):
    """Keeps one :class:`View`."""

    def load(self) -> View | None:
        """The stored view, or None when nothing was stored yet."""
        ...

    def compare_and_set(self, old_epoch: int | None, new: View) -> bool:
        """Store ``new`` if the stored epoch is ``old_epoch`` (None: nothing stored).

        Returns False, storing nothing, when someone else changed the view first.
        """
        ...


class FileStateStore:
    """The view in a JSON file (mode 0600), written atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> View | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            return View.from_json(json.loads(text))
        except (ValueError, UnicodeDecodeError) as exc:
            raise StateError(f"{self.path}: not a replicaproxy state file: {exc}") from None

    def compare_and_set(self, old_epoch: int | None, new: View) -> bool:
        current = self.load()
        if (current.epoch if current is not None else None) != old_epoch:
            return False
        self._write(new)
        return True

    def _write(self, view: View) -> None:
        folder = self.path.parent
        data = (json.dumps(view.to_json(), indent=2, sort_keys=True) + "\n").encode()
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class FileViewStore:
    """The view in a state file: one proxy, no peers, no leases.

    The revision is the view's epoch, as the file's own compare-and-set uses it.
    The file is small and local, so it is read and written on the event loop's
    thread, as before there was an interface.
    """

    kind = "file"
    shared = False

    def __init__(self, path: str | Path) -> None:
        self.file = FileStateStore(path)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "endpoints": [], "path": str(self.file.path)}

    async def snapshot(self) -> Snapshot:
        view = self.file.load()
        return Snapshot(None if view is None else Stored(view, view.epoch), {}, 0)

    async def swap(self, revision: int | None, new: View) -> Stored | None:
        if not self.file.compare_and_set(revision, new):
            return None
        return Stored(new, new.epoch)

    async def join(self, member: Member, ttl: float) -> None:
        return None

    async def renew(self, within: float) -> bool:
        return True

    async def leave(self) -> None:
        return None

    async def watch(self, after: int) -> AsyncIterator[Change]:
        # Nobody else writes the file: nothing ever comes.
        await asyncio.Event().wait()
        yield Change()  # pragma: no cover - never reached

    async def close(self) -> None:
        return None


def open_store(url: str, *, options: StoreOptions | None = None) -> ViewStore:
    """The store a ``view_store`` URL names (checked already by the config)."""
    if url.startswith("etcd://"):
        from replicaproxy.etcd import EtcdViewStore, parse_etcd_url

        endpoints, prefix = parse_etcd_url(url, where="view_store")
        return EtcdViewStore(endpoints, prefix, options or StoreOptions())
    return FileViewStore(url.removeprefix("file:"))


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How to reach a network store: TLS files and a user (all optional)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    user: str = ""
    password: str = ""
