"""Timers: every session's timers on one of the event loop's."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from replicaproxy.io import driver
from replicaproxy.io.driver import Timers


def test_timers_fire_in_order_and_cancelled_ones_never() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        timers = Timers()
        fired: list[str] = []
        done = asyncio.Event()
        timers.call_later(0.03, lambda: fired.append("c"))
        timers.call_later(0.01, lambda: fired.append("a"))
        timers.call_later(0.02, lambda: fired.append("b")).cancel()
        late = timers.call_later(0.05, lambda: fired.append("never"))
        timers.call_at(loop.time() + 0.02, lambda: fired.append("b2"))
        timers.call_later(0.04, done.set)
        await done.wait()
        late.cancel()
        late.cancel()  # (twice is once)
        await asyncio.sleep(0.03)
        return fired

    assert uvloop.run(main()) == ["a", "b2", "c"]


def test_a_timer_set_when_one_fires_waits_for_a_later_turn_of_the_loop() -> None:
    """A timer that sets itself again with no delay lets the loop's other work run
    in between, as the loop's own timers do: one turn does not fire them all."""

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        timers = Timers()
        turns = [0]
        seen: list[int] = []
        done = asyncio.Event()

        def turn() -> None:
            turns[0] += 1
            if not done.is_set():
                loop.call_soon(turn)

        def again() -> None:
            seen.append(turns[0])
            if len(seen) < 20:
                timers.call_later(0, again)
            else:
                done.set()

        loop.call_soon(turn)
        timers.call_later(0, again)
        await done.wait()
        return seen

    seen = uvloop.run(main())
    assert seen == sorted(seen) and len(set(seen)) > 1, seen


def test_cancelled_timers_do_not_pile_up_or_keep_their_callbacks() -> None:
    async def main() -> None:
        timers = Timers()
        kept = [timers.call_later(3600, lambda: None) for _ in range(10)]
        for _ in range(20 * driver.TIMERS_SLACK):
            timers.call_later(3600, lambda: None).cancel()
        heap = timers._heap
        assert len(heap) <= 2 * driver.TIMERS_SLACK + len(kept) + 1
        assert all(e.callback is None for _, _, e in heap if e.cancelled)
        assert sum(not e.cancelled for _, _, e in heap) == len(kept)
        done = asyncio.Event()
        timers.call_later(0.001, done.set)
        await done.wait()

    uvloop.run(main())


def test_a_failing_callback_is_logged_and_the_others_still_fire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> list[str]:
        timers = Timers()
        fired: list[str] = []
        done = asyncio.Event()

        def fail() -> None:
            raise RuntimeError("a bug")

        timers.call_later(0.01, fail)
        timers.call_later(0.01, lambda: fired.append("after"))
        timers.call_later(0.02, done.set)
        await done.wait()
        return fired

    assert uvloop.run(main()) == ["after"]
    assert "timer callback" in caplog.text and "a bug" in caplog.text
