"""Whether the data path (the session, its events, framers and driver) runs compiled or not.

``setup.py`` builds both modules with mypyc when it can, and the install falls back
to pure Python when it cannot; both behave the same. In a source checkout installed
with ``pip install -e`` the compiled modules sit next to their sources and take
precedence over them, so a source edited since the build is not what runs until the
next install: :func:`stale` names those.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from replicaproxy.core import events, framing, http, memcached, postgres, resp, session
from replicaproxy.io import driver

MODULES: tuple[ModuleType, ...] = (
    events,
    session,
    framing,
    resp,
    http,
    postgres,
    memcached,
    driver,
)


def _built(module: ModuleType) -> Path | None:
    """The compiled file ``module`` was loaded from, None if it runs as Python."""
    path = Path(module.__file__ or "")
    return path if path.suffix in (".so", ".pyd") else None


def data_path() -> str:
    """``compiled`` or ``pure Python``."""
    return "compiled" if all(_built(m) for m in MODULES) else "pure Python"


def stale(modules: Iterable[ModuleType] = MODULES) -> list[str]:
    """Compiled modules whose source beside them changed after they were built."""
    names = []
    for module in modules:
        built = _built(module)
        if built is None:
            continue
        source = built.with_name(module.__name__.rsplit(".", 1)[1] + ".py")
        if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            names.append(module.__name__)
    return names
