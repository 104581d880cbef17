"""The data path's build: compiled where the install could, and never stale."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import ModuleType

import pytest

from replicaproxy import compiled


def test_the_data_path_is_compiled_where_the_install_could() -> None:
    if os.environ.get("REPLICAPROXY_PURE"):  # make test-pure: pure Python on purpose
        assert compiled.data_path() == "pure Python"
        assert all(str(m.__file__).endswith(".py") for m in compiled.MODULES)
        return
    if compiled.data_path() != "compiled":
        reason = (
            "the data path runs as pure Python here: installed without a C compiler "
            "or with REPLICAPROXY_COMPILE=0"
        )
        if os.environ.get("REPLICAPROXY_REQUIRE_ALL"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert compiled.stale() == []


def test_a_source_edited_after_the_build_is_named(tmp_path: Path) -> None:
    built = tmp_path / "session.cpython-311-x86_64-linux-gnu.so"
    source = tmp_path / "session.py"
    module = ModuleType("replicaproxy.core.session")
    module.__file__ = str(built)
    source.write_text("# the source\n")
    built.write_bytes(b"\x7fELF")
    assert compiled.stale([module]) == []  # built after the source
    later = time.time() + 10
    os.utime(source, (later, later))
    assert compiled.stale([module]) == ["replicaproxy.core.session"]
    pure = ModuleType("replicaproxy.io.driver")
    pure.__file__ = str(tmp_path / "driver.py")
    assert compiled.stale([pure]) == []  # pure Python is never stale
