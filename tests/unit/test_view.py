"""Tier 1: the view's legal moves, its persistence and reconciliation."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from replicaproxy.core.view import IN_SYNC, STALE, TRANSITIONS, IllegalTransition, View
from replicaproxy.store import FileStateStore, StateError


def view() -> View:
    return View.new("a", ["b", "c"])


def test_new_view_has_every_replica_in_sync_at_epoch_0() -> None:
    v = view()
    assert v.epoch == 0 and v.primary == "a"
    assert dict(v.backends) == {"a": IN_SYNC, "b": IN_SYNC, "c": IN_SYNC}


@pytest.mark.parametrize(
    ("start", "move", "legal"),
    [
        (IN_SYNC, "mark_stale", True),
        (STALE, "mark_stale", True),
        (STALE, "mark_synced", True),
        (IN_SYNC, "mark_synced", False),
    ],
)
def test_transition_table(start: str, move: str, legal: bool) -> None:
    assert ((start, move) in TRANSITIONS) == legal
    v = view()
    if start == STALE:
        v = v.mark_stale("b")
    if legal:
        getattr(v, move)("b")
    else:
        with pytest.raises(IllegalTransition, match="cannot mark synced 'b': it is in_sync"):
            getattr(v, move)("b")


def test_every_change_bumps_the_epoch_and_a_no_op_does_not() -> None:
    v = view()
    v1 = v.mark_stale("b")
    assert v1.epoch == 1
    assert v1.mark_stale("b") is v1
    assert v1.mark_synced("b").epoch == 2


def test_failover_promotes_an_in_sync_replica_and_makes_the_old_primary_stale() -> None:
    v = view().promote("b", old_primary_missed_input=True)
    assert v.primary == "b" and v.epoch == 1
    assert v.backends["a"] == STALE
    with pytest.raises(IllegalTransition, match="it is stale"):
        v.promote("a", old_primary_missed_input=True)


def test_switchover_keeps_the_old_primary_in_sync() -> None:
    v = view().promote("c", old_primary_missed_input=False)
    assert v.primary == "c" and v.backends["a"] == IN_SYNC


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda v: v.promote("a", old_primary_missed_input=False), "already the primary"),
        (lambda v: v.mark_stale("a"), "it is the primary"),
        (lambda v: v.mark_synced("a"), "it is the primary"),
        (lambda v: v.promote("zz", old_primary_missed_input=False), "not a primary or replica"),
        (lambda v: v.mark_stale("b").promote("b", old_primary_missed_input=False), "stale"),
    ],
)
def test_illegal_moves_raise(action: object, message: str) -> None:
    with pytest.raises(IllegalTransition, match=message):
        action(view())  # type: ignore[operator]


def test_reconcile_new_backend_is_stale_and_a_gone_one_is_dropped() -> None:
    v, notes = view().reconcile("a", ["a", "b", "d"])
    assert dict(v.backends) == {"a": IN_SYNC, "b": IN_SYNC, "d": STALE}
    assert v.epoch == 1
    assert any("d is new" in n for n in notes) and any("c is no longer" in n for n in notes)
    with pytest.raises(IllegalTransition, match="--reset-state"):
        view().promote("b", old_primary_missed_input=True).reconcile("a", ["a", "c"])


def test_json_round_trip_and_bad_files(tmp_path: Path) -> None:
    v = view().promote("b", old_primary_missed_input=True).with_clean(False)
    assert View.from_json(json.loads(json.dumps(v.to_json()))) == v
    bads: list[object] = [
        [],
        {"epoch": -1, "primary": "a", "backends": {"a": "in_sync"}},
        {"epoch": 1, "primary": "a", "backends": {"a": "stale"}},
        {"epoch": 1, "primary": "x", "backends": {"a": "in_sync"}},
    ]
    for bad in bads:
        with pytest.raises(ValueError):
            View.from_json(bad)


def test_file_store_is_atomic_private_and_compare_and_set(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path / "state.json")
    assert store.load() is None
    v0 = view()
    assert store.compare_and_set(None, v0)
    assert stat.S_IMODE(os.stat(tmp_path / "state.json").st_mode) == 0o600
    v1 = v0.mark_stale("c")
    assert not store.compare_and_set(5, v1), "a stale epoch must not overwrite"
    assert store.load() == v0
    assert store.compare_and_set(0, v1)
    assert store.load() == v1
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "no temp files left"


def test_file_store_reports_garbage_and_unwritable_places(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(StateError, match="not a replicaproxy state file"):
        FileStateStore(path).load()
    with pytest.raises(StateError, match="cannot write"):
        FileStateStore(tmp_path / "missing-dir" / "s.json").compare_and_set(None, view())


def test_reconcile_resets_a_backend_given_a_new_address() -> None:
    v, notes = view().reconcile("a", ["a", "b", "c"], reset=["c", "a"])
    assert dict(v.backends) == {"a": IN_SYNC, "b": IN_SYNC, "c": STALE}
    assert v.epoch == 1
    assert any("c has a new address" in n for n in notes)
    same, _ = view().reconcile("a", ["a", "b", "c"])
    assert same.epoch == 0, "no change, no new epoch"
