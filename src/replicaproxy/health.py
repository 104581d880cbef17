"""Active health checks: a TCP connect (a TLS handshake too for a backend with ``tls``),
optionally a probe and its expected answer.

Each backend is checked every ``interval``; ``fall`` failures in a row mark it
down, ``rise`` successes in a row mark it up (HAProxy's terms). The counting is
:class:`HealthState`, without I/O; :class:`HealthChecker` runs the probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Literal

from replicaproxy.config import Address, HealthConfig
from replicaproxy.logutil import LOCAL_ERRNOS, describe_error
from replicaproxy.tls import ClientTls, agreed_socket

log = logging.getLogger(__name__)

Health = Literal["up", "down", "unknown"]

#: What probe() answers when this machine, not the backend, made the check fail.
LOCAL_FAILURE = "local failure"
#: Most bytes read while looking for ``expect`` in a probe's answer.
EXPECT_READ_LIMIT = 64 * 1024


class HealthState:
    """Counts check results for one backend and says when its health changes."""

    def __init__(self, fall: int, rise: int) -> None:
        self.fall = fall
        self.rise = rise
        self.health: Health = "unknown"
        self._fails = 0
        self._oks = 0

    def record(self, ok: bool) -> Health | None:
        """Count one result; return the new health when it changed."""
        if ok:
            self._oks += 1
            self._fails = 0
            # From unknown, one success is enough: the proxy just started and
            # waiting for `rise` would only delay the first status.
            if self.health != "up" and (self.health == "unknown" or self._oks >= self.rise):
                self.health = "up"
                return "up"
        else:
            self._fails += 1
            self._oks = 0
            if self.health != "down" and self._fails >= self.fall:
                self.health = "down"
                return "down"
        return None


#: A judge of a probe's answer (see :func:`probe`): True when it says the backend is
#: up, a reason when it says it is not, False while it needs more of the answer.
Judge = Callable[[bytes], bool | str]


async def probe(
    address: Address,
    config: HealthConfig,
    tls: ClientTls | None = None,
    judge: Judge | None = None,
) -> str | None:
    """Check ``address`` once; return None when healthy, else why not.

    With ``tls``, the check is a TLS handshake (a certificate that fails verification
    fails the check, with OpenSSL's reason) and ``send``/``expect`` go through it.
    ``judge``, where given, reads the answer to ``send`` in place of ``expect``.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(config.timeout):
            reader, writer = await open_connection(address, tls)
            if config.send:
                writer.write(config.send)
                await writer.drain()
            if judge is not None:
                seen = b""
                while True:
                    data = await reader.read(4096)
                    seen = (seen + data)[:EXPECT_READ_LIMIT]
                    verdict = judge(seen)
                    if verdict is True:
                        break
                    if isinstance(verdict, str):
                        return verdict
                    if not data:
                        return "closed before it answered"
            elif config.expect:
                seen = b""
                while config.expect not in seen:
                    data = await reader.read(4096)
                    if not data:
                        return f"closed before sending {config.expect!r}"
                    seen = (seen + data)[-EXPECT_READ_LIMIT:]
    except TimeoutError:
        return f"no answer within {config.timeout} s"
    except OSError as exc:
        if exc.errno in LOCAL_ERRNOS:
            # This proxy is out of descriptors or memory: that says nothing about
            # the backend, so the check counts neither way.
            log.warning("health: cannot check %s: %s (local)", address, describe_error(exc))
            return LOCAL_FAILURE
        return describe_error(exc)
    finally:
        if writer is not None:
            await close(writer, config.timeout)
    return None


async def open_connection(
    address: Address, tls: ClientTls | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to ``address``, over TLS when ``tls`` says so (the caller bounds the time)."""
    if tls is None:
        return await asyncio.open_connection(address.host, address.port)
    if tls.preface:
        sock = await agreed_socket(address.host, address.port, tls.preface)
        return await asyncio.open_connection(
            sock=sock, ssl=tls.context, server_hostname=tls.server_name
        )
    return await asyncio.open_connection(
        address.host, address.port, ssl=tls.context, server_hostname=tls.server_name
    )


async def close(writer: asyncio.StreamWriter, within: float) -> None:
    """Close a stream, waiting at most ``within`` seconds for it to end.

    Over TLS, closing waits for the peer's answer to our close_notify (asyncio gives it
    30 s): a hung backend must not hold a health check up that long.
    """
    writer.close()
    try:
        async with asyncio.timeout(within):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()


class HealthChecker:
    """Checks every backend in the background; calls ``on_change(name, health, reason)``."""

    def __init__(
        self,
        config: HealthConfig,
        backends: Mapping[str, Address],
        on_change: Callable[[str, Health, str], None],
        tls_of: Callable[[str], ClientTls | None] = lambda name: None,
    ) -> None:
        self.config = config
        self.addresses = dict(backends)
        self._tls_of = tls_of
        self.states = {name: HealthState(config.fall, config.rise) for name in backends}
        self._on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []
        self.last_error: dict[str, str] = {}

    def health(self, name: str) -> Health:
        state = self.states.get(name)
        return state.health if state is not None else "unknown"

    def start(self) -> None:
        for name in self.addresses:
            self._tasks.append(asyncio.create_task(self._loop(name), name=f"health:{name}"))

    def cancel(self) -> None:
        """Stop checking, without waiting (the tasks end at their next await)."""
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    def _record(self, name: str, state: HealthState, error: str | None) -> None:
        """Count one check's result; tell ``on_change`` when the health flips."""
        if error is not None:
            self.last_error[name] = error
        changed = state.record(error is None)
        if changed is not None:
            try:
                self._on_change(name, changed, error or "check passed")
            except Exception:
                log.exception("health: handling %s going %s failed", name, changed)

    async def _loop(self, name: str) -> None:
        address = self.addresses[name]
        state = self.states[name]
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            error = await probe(address, self.config, self._tls_of(name))
            if error != LOCAL_FAILURE:  # this machine's shortage counts neither way
                self._record(name, state, error)
            # Checks start `interval` apart, however long each took.
            await asyncio.sleep(max(0.0, self.config.interval - (loop.time() - started)))
