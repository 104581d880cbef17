"""replicaproxy: a TCP proxy that keeps hot replicas of a stateful server in step."""

from __future__ import annotations

__version__ = "0.1.0"
