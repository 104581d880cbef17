"""``python -m replicaproxy``: the same as the ``replicaproxy`` command."""

from __future__ import annotations

from replicaproxy.cli import main

main()
