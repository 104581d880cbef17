"""The admin HTTP API: status, metrics, a status page, and promote / mark-synced."""

from __future__ import annotations

from replicaproxy.admin.app import AdminServer, make_app

__all__ = ["AdminServer", "make_app"]
