"""Refuses to run the tests on a compiled data path older than its source.

With ``pip install -e``, mypyc's builds of the session and the driver sit beside their
sources and are what Python imports (see ``replicaproxy.compiled``): after an edit,
the tests would test the previous build. ``make test`` reinstalls first.
"""

from __future__ import annotations

import pytest

from replicaproxy import compiled


def pytest_sessionstart(session: pytest.Session) -> None:
    if stale := compiled.stale():
        pytest.exit(
            f"the compiled {' and '.join(stale)} is older than its source; "
            "reinstall first (make install, or pip install -e .)",
            returncode=2,
        )
