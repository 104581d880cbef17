"""Where the view is kept between runs.

:class:`StateStore` is the interface (a distributed one, with compare-and-set
on the epoch, can sit behind it later); :class:`FileStateStore` keeps the view
in one JSON file, replaced atomically: temp file, fsync, rename, fsync of the
folder, so a crash leaves either the old view or the new one, never half.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

from replicaproxy.core.view import View


class StateError(Exception):
    """The stored view cannot be read or written; the message says where and why."""


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
