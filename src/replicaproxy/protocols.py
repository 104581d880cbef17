"""The server's side of framed protocols: each session's framing, and the rules behind it.

The framers and rules themselves are pure (``core/framing.py`` and a module per
protocol: ``core/resp.py``, ``core/http.py``, ``core/postgres.py``,
``core/memcached.py``);
this module holds what needs the config or the network: the rules as configured,
and, for ``resp``, what the primary itself says about its commands (Redis 7's
``COMMAND`` tips), read at start and whenever the primary changes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from replicaproxy.config import Address, Config
from replicaproxy.core import postgres
from replicaproxy.core.framing import GARBAGE, MORE, Framing
from replicaproxy.core.http import HttpFraming
from replicaproxy.core.memcached import McFraming
from replicaproxy.core.postgres import PgFraming
from replicaproxy.core.resp import RespFraming, RespParser, RespRules, tips_from_command
from replicaproxy.health import Judge, close, open_connection
from replicaproxy.logutil import describe_error
from replicaproxy.tls import ClientTls

log = logging.getLogger(__name__)

#: A COMMAND reply is about 90 KB from Redis 7.0 (240 commands); far more is not one.
MAX_COMMAND_REPLY = 16 * 1024 * 1024
_COMMAND = b"*1\r\n$7\r\nCOMMAND\r\n"
#: Seconds to wait for the primary to end the COMMAND connection (over TLS, its answer
#: to our close_notify); the reply is in by then, so this only bounds the goodbye.
CLOSE_WAIT = 1.0


class Protocols:
    """Makes each new session's framing for the configured protocol."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.protocol = config.proxy.protocol
        self._tips: dict[str, str] | None = None
        self._tips_from: str | None = None  # the backend whose tips these are
        self.rules = self._resp_rules()
        self._other()

    def _resp_rules(self) -> RespRules:
        resp = self.config.protocols.resp
        return RespRules(
            self._tips if resp.server_tips else None,
            ignore=resp.ignore,
            unordered=resp.unordered,
            exact=resp.exact,
            source=f"COMMAND on {self._tips_from}" if self._tips_from else "built-in",
        )

    def _other(self) -> None:
        """The other protocols' settings, as their framings take them."""
        protocols = self.config.protocols
        self._headers = frozenset(h.encode() for h in protocols.http.ignore_headers)
        self._parameters = frozenset(p.encode() for p in protocols.postgres.ignore_parameters)

    def reconfigure(self, config: Config) -> None:
        """A reload: new sessions frame by the new config (live ones keep theirs)."""
        self.config = config
        self.protocol = config.proxy.protocol
        self.rules = self._resp_rules()
        self._other()

    def framing(self) -> Framing | None:
        """The framing for one new session; None for ``bytes``."""
        protocol = self.protocol
        if protocol == "resp":
            return RespFraming(self.rules)
        if protocol == "http":
            return HttpFraming(self._headers)
        if protocol == "postgres":
            return PgFraming(self._parameters)
        if protocol == "memcached":
            return McFraming()
        return None

    @property
    def preamble(self) -> bool:
        """Whether a client's first bytes may be for the proxy itself (PostgreSQL's
        SSLRequest, GSSENCRequest and CancelRequest)."""
        return self.protocol == "postgres"

    def liveness(self) -> tuple[bytes, bytes]:
        """What a backend must answer to count as alive (health ``send``, ``expect``):
        for RESP, any reply to PING (-NOAUTH included); for memcached, its version; for
        PostgreSQL, an answer to a login that is not "cannot connect now" (see
        :meth:`judge`); for the others a connection is enough (a crashed server
        refuses it)."""
        if self.protocol == "resp":
            return b"PING\r\n", b"\r\n"
        if self.protocol == "memcached":
            return b"version\r\n", b"VERSION"
        if self.protocol == "postgres":
            return postgres.liveness_request(), b""
        return b"", b""

    def judge(self) -> Judge | None:
        """How to read the answer to :meth:`liveness`'s request, where ``expect`` is not
        enough: PostgreSQL's, which must not say "cannot connect now"."""
        return postgres.liveness_verdict if self.protocol == "postgres" else None

    def wants_tips(self) -> bool:
        return self.protocol == "resp" and self.config.protocols.resp.server_tips

    async def learn(
        self, name: str, address: Address, within: float, tls: ClientTls | None = None
    ) -> None:
        """Read the rules ``name`` (the primary) gives its own commands, where it can say.

        A server that does not answer (Redis 6, a fork without tips, a password) leaves
        the rules as they were; the built-in ones cover the usual commands.
        """
        if not self.wants_tips():
            return
        try:
            async with asyncio.timeout(within):
                reply = await _ask_command(address, tls)
            tips = tips_from_command(reply)
        except (TimeoutError, OSError, ValueError) as exc:
            why = (
                f"no answer within {within} s"
                if isinstance(exc, TimeoutError)
                else describe_error(exc)
            )
            log.info(
                "%s did not give its command tips (COMMAND: %s); the %s rules apply",
                name,
                why,
                "built-in" if self._tips is None else f"rules from {self._tips_from}",
            )
            return
        changed = tips != self._tips
        self._tips = tips
        self._tips_from = name
        self.rules = self._resp_rules()
        if changed:
            kinds = self.rules.describe()
            log.info(
                "protocol resp: rules from %s's COMMAND tips and the built-in ones: %s",
                name,
                "; ".join(f"{kind}: {len(names)} commands" for kind, names in kinds.items()),
            )

    def status(self) -> dict[str, Any]:
        """What the status page and ``ctl status`` show about the protocol."""
        out: dict[str, Any] = {"name": self.protocol}
        if self.protocol == "resp":
            out["rules_from"] = self.rules.source
            out["rules"] = self.rules.describe()
        elif self.protocol == "http":
            out["rules"] = {"ignore_headers": sorted(h.decode() for h in self._headers)}
        elif self.protocol == "postgres":
            out["rules"] = {
                "ignore": ["BackendKeyData", "NoticeResponse"],
                "ignore_parameters": sorted(p.decode() for p in self._parameters),
            }
        elif self.protocol == "memcached":
            out["rules"] = {"ignore": ["stats", "version"], "without_cas": ["gets", "gats", "mg"]}
        return out


async def _ask_command(address: Address, tls: ClientTls | None = None) -> bytes:
    """Send COMMAND to ``address`` (over TLS with ``tls``) and return its whole reply."""
    reader, writer = await open_connection(address, tls)
    try:
        writer.write(_COMMAND)
        await writer.drain()
        parser = RespParser()
        reply = bytearray()
        while True:
            data = await reader.read(256 * 1024)
            if not data:
                raise ValueError("closed before answering COMMAND")
            reply += data
            end = parser.feed(data, 0)
            if end == GARBAGE:
                raise ValueError("the answer to COMMAND is not RESP")
            if end != MORE:
                break
            if len(reply) > MAX_COMMAND_REPLY:
                raise ValueError(f"the answer to COMMAND is over {MAX_COMMAND_REPLY} bytes")
        if reply[:1] == b"-":
            raise ValueError(bytes(reply[1:-2]).decode(errors="replace"))
        return bytes(reply)
    finally:
        await close(writer, CLOSE_WAIT)
