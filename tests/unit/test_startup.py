"""Tier 1: what the proxy process does once it has started."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

from replicaproxy.cli import freeze_startup_objects
from replicaproxy.config import Address, Overrides, build_config
from replicaproxy.server import Server


class Node:
    """An object the collector tracks, which can hold itself (a cycle)."""

    def __init__(self) -> None:
        self.other: Node | None = None


async def test_serve_calls_on_start_once_the_proxy_listens(tmp_path: Path) -> None:
    config = build_config(
        None,
        Overrides(
            listen="127.0.0.1:0",
            primary="127.0.0.1:1",  # (nothing listens there: the proxy starts all the same)
            state_file=str(tmp_path / "state.json"),
        ),
    )
    server = Server(config)
    seen: list[tuple[Address | None, bool]] = []

    def started() -> None:
        seen.append((server.bound, server.started.is_set()))
        server.request_shutdown()

    await asyncio.wait_for(server.serve(handle_signals=False, on_start=started), 10)
    [(bound, is_started)] = seen
    assert bound is not None and bound.port != 0
    assert is_started


def test_startup_garbage_is_collected_and_what_lives_is_left_out_of_later_collections() -> None:
    garbage = Node()
    garbage.other = garbage  # a cycle nothing refers to: only the collector frees it
    gone = weakref.ref(garbage)
    del garbage
    kept = Node()
    kept.other = kept
    try:
        freeze_startup_objects()
        assert gone() is None, "start-up's garbage is collected before the rest is frozen"
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects()), "a collection would visit it"
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
