"""Tier 1: the request label of replicaproxy_allowed_differences stays a bounded set."""

from __future__ import annotations

from types import SimpleNamespace

from replicaproxy.server import MAX_REQUEST_LABELS, Server


def label(host: SimpleNamespace, request: str) -> str:
    return Server._request_label(host, request)  # type: ignore[arg-type]


def test_a_request_is_labelled_by_its_command_not_its_target_or_text() -> None:
    host = SimpleNamespace(_request_labels=set())
    assert label(host, "GET /users/1?x=2") == "GET"
    assert label(host, "PUT /a/very/long/path/name.txt") == "PUT"
    assert label(host, "CLIENT ID") == "CLIENT ID"
    assert label(host, "COMMAND DOCS") == "COMMAND DOCS"
    assert label(host, "'select abalance from pgbench_accounts where aid = 7'") == "SELECT"
    assert label(host, "stats") == "STATS"
    assert label(host, "") == "other"


def test_past_the_limit_new_labels_are_other() -> None:
    host = SimpleNamespace(_request_labels=set())
    for i in range(MAX_REQUEST_LABELS):
        assert label(host, f"CMD{i}") == f"CMD{i}"
    assert label(host, "ONEMORE") == "other"
    assert label(host, "CMD3 x") == "CMD3", "a known label is still given"
