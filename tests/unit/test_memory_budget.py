"""The per-backend memory budget that sessions share (replica_memory)."""

from __future__ import annotations

from replicaproxy.io.driver import MemoryBudget


def test_past_its_limit_a_budget_calls_over_at_once_and_once() -> None:
    calls: list[str] = []
    budget = MemoryBudget("r2", 100, calls.append)
    budget.add(60)
    budget.add(40)
    assert (budget.held, calls) == (100, []), "at the limit is within it"
    budget.add(1)
    assert calls == ["r2"], "at once: the loop may read much more before a later callback"
    assert budget.held == 101
    budget.add(-101)
    budget.add(500)
    assert calls == ["r2"], "once, until rearmed"
    budget.rearm()
    budget.add(-1)
    assert calls == ["r2"], "a shrinking backlog never counts as going past"
    budget.add(1)
    assert calls == ["r2", "r2"]


def test_what_over_gives_back_is_counted() -> None:
    budget = MemoryBudget("s", 10, lambda name: budget.add(-budget.held))
    budget.add(11)
    assert budget.held == 0, "the sessions it left let go of what they held, from inside add"


def test_a_lower_limit_counts_from_the_next_measurement() -> None:
    calls: list[str] = []
    budget = MemoryBudget("s", 1000, calls.append)
    budget.add(800)
    budget.limit = 500  # (a reload)
    assert calls == []
    budget.add(1)
    assert calls == ["s"]
