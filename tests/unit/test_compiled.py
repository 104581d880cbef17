"""The data path's build: compiled where the install could, and never stale."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path
from types import ModuleType

import pytest

from replicaproxy import compiled
from replicaproxy.core import events


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


#: A value of each type the events' fields have (compiled, the types are checked).
_SAMPLES: dict[str, object] = {
    "str": "name",
    "str | None": "an error",
    "bytes": b"data",
    "bool": True,
    "float": 1.5,
    "Timer": events.Timer.LINGER,
    "tuple[str, ...]": ("a", "b"),
}


def test_each_event_and_action_builds_by_its_own_init_with_its_fields_in_order() -> None:
    """events.py spells out each class's ``__init__`` (compiled, the dataclass's one
    would run as Python per object): it must take the dataclass's fields, in order,
    with their defaults, and set each one (read from the source: a compiled
    ``__init__`` shows no signature)."""
    tree = ast.parse((Path(events.__file__ or "").parent / "events.py").read_text())
    checked = 0
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name in ("Event", "Action"):
            continue
        if not any(isinstance(b, ast.Name) and b.id in ("Event", "Action") for b in node.bases):
            continue
        annotated = [
            s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        ]
        fields = [
            (ast.unparse(s.target), None if s.value is None else ast.unparse(s.value))
            for s in annotated
        ]
        [init] = [s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"]
        args = [a.arg for a in init.args.args[1:]]
        defaults = [None] * (len(args) - len(init.args.defaults)) + [
            ast.unparse(d) for d in init.args.defaults
        ]
        assert list(zip(args, defaults, strict=True)) == fields, node.name
        sets = [ast.unparse(s) for s in init.body if isinstance(s, ast.Assign)]
        assert sets == [f"self.{name} = {name}" for name, _ in fields], node.name
        values = [_SAMPLES[ast.unparse(s.annotation)] for s in annotated]
        made = getattr(events, node.name)(*values)
        assert [getattr(made, name) for name, _ in fields] == values, node.name
        checked += 1
    assert checked > 30
