"""The view in etcd v3, through etcd's JSON gateway (``/v3/...``) and aiohttp.

Why the gateway and not a gRPC client: ``aetcd`` 1.0.0 (the maintained asyncio
gRPC client) was tried side by side with this and works under uvloop (CAS, leases
and watches, a few milliseconds per watch event, as here), but it opens only
``insecure_channel`` (no TLS to etcd, which the config must offer) and one endpoint,
and it brings grpcio and protobuf along. The gateway is part of every etcd v3 server,
speaks JSON over the aiohttp the proxy already has, and leaves TLS, timeouts and the
choice among several endpoints to us (README "Several proxies, one view").

Layout under ``PREFIX``::

    PREFIX/view            the view, JSON (View.to_json), changed only by a
                           transaction comparing its mod_revision
    PREFIX/proxies/NAME    one per running proxy, under its lease: {"run", "listen",
                           "admin", "version", "started"}

Every request has a deadline; an endpoint that refuses or does not answer in its
share of it is left for the next one. What the gateway answers is checked before
use: a value that is not what a proxy wrote is a :class:`StateError` naming the key.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from replicaproxy.config import Address, ConfigError, parse_address
from replicaproxy.core.view import View
from replicaproxy.store import (
    Change,
    Member,
    Snapshot,
    StateError,
    Stored,
    StoreDown,
    StoreOptions,
)

log = logging.getLogger(__name__)

#: The deadline of one request (all endpoints together) when the caller gives none. A
#: write commits in milliseconds on a healthy cluster; 2 s is etcd's own default
#: request timeout for a client that does not set one.
REQUEST_TIMEOUT = 2.0
#: The largest answer read from the gateway: a view and a few hundred members are a few
#: KiB; this bounds what a wrong server can make us buffer.
MAX_ANSWER = 4 * 1024 * 1024
#: gRPC status codes that mean "try again later" rather than "you asked wrong".
_UNAVAILABLE = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
_UNAUTHENTICATED = 16


def parse_etcd_url(url: str, *, where: str) -> tuple[list[Address], str]:
    """``etcd://HOST:PORT[,HOST:PORT...]/PREFIX`` -> (endpoints, "/PREFIX").

    Raises ConfigError naming ``where``.
    """
    if not url.startswith("etcd://"):
        raise ConfigError(f"{where}: expected 'etcd://HOST:PORT[,HOST:PORT...]/PREFIX'")
    rest = url[len("etcd://") :]
    hosts, slash, prefix = rest.partition("/")
    if not slash or not prefix.strip("/"):
        raise ConfigError(
            f"{where}: etcd URL needs a key prefix after the endpoints, like "
            f"'etcd://127.0.0.1:2379/replicaproxy', got {url!r}"
        )
    if any(c.isspace() for c in prefix) or "\0" in prefix:
        raise ConfigError(f"{where}: the key prefix must not hold spaces, got {prefix!r}")
    endpoints = [parse_address(h, where=where) for h in hosts.split(",")] if hosts else []
    if not endpoints:
        raise ConfigError(f"{where}: etcd URL names no endpoint, got {url!r}")
    return endpoints, "/" + prefix.strip("/")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise StateError(f"{what}: expected base64 text from etcd, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise StateError(f"{what}: not base64") from None


def _int(value: object, what: str) -> int:
    """An int64 as the gateway writes it (a decimal string; absent means 0)."""
    if value is None:
        return 0
    try:
        return int(str(value))
    except ValueError:
        raise StateError(f"{what}: expected an integer from etcd, got {value!r}") from None


def _prefix_end(prefix: str) -> str:
    """The key after every key starting with ``prefix`` (etcd's range_end for a prefix)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes end in "/", never in byte 0xff
    return base64.b64encode(bytes(raw)).decode()


class EtcdViewStore:
    """The view and the members of one deployment, under one key prefix in etcd."""

    kind = "etcd"
    shared = True

    def __init__(self, endpoints: list[Address], prefix: str, options: StoreOptions) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.options = options
        self.view_key = f"{prefix}/view"
        self.members_prefix = f"{prefix}/proxies/"
        self._tls = bool(options.ca_file or options.cert_file)
        self._ssl: ssl.SSLContext | None = None
        self._http: aiohttp.ClientSession | None = None
        self._at = 0  # the endpoint that answered last: asked first next time
        self._token = ""
        self._lease = 0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "endpoints": [str(e) for e in self.endpoints],
            "prefix": self.prefix,
            "tls": self._tls,
        }

    # ----------------------------------------------------------------- HTTP

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            if self._tls:
                try:
                    context = ssl.create_default_context(cafile=self.options.ca_file or None)
                    if self.options.cert_file:
                        context.load_cert_chain(
                            self.options.cert_file, self.options.key_file or None
                        )
                except (OSError, ssl.SSLError) as exc:
                    raise StateError(f"etcd TLS files: {exc}") from None
                self._ssl = context
            # No proxy from the environment: etcd is reached directly, as the admin API is.
            self._http = aiohttp.ClientSession(trust_env=False)
        return self._http

    def _ssl_arg(self) -> ssl.SSLContext | bool:
        return self._ssl if self._ssl is not None else False

    def _url(self, endpoint: Address, path: str) -> str:
        return f"{'https' if self._tls else 'http'}://{endpoint}{path}"

    async def _call(
        self, path: str, body: dict[str, Any], within: float = REQUEST_TIMEOUT
    ) -> dict[str, Any]:
        """POST ``body`` to the gateway; the answer as a dict. StoreDown if no endpoint could.

        Endpoints are asked in turn, the one that answered last first, each with an
        equal share of what is left of ``within``.
        """
        deadline = time.monotonic() + within
        problems: list[str] = []
        n = len(self.endpoints)
        for i in range(n):
            endpoint = self.endpoints[(self._at + i) % n]
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                answer = await self._post(endpoint, path, body, left / (n - i))
            except StoreDown as exc:
                problems.append(f"{endpoint}: {exc}")
                continue
            self._at = (self._at + i) % n
            error = answer.get("error")
            if isinstance(error, dict) or ("code" in answer and "message" in answer):
                detail = error if isinstance(error, dict) else answer
                code = _int(detail.get("code"), "error code")
                message = str(detail.get("message", detail.get("error", "")))
                if code == _UNAUTHENTICATED and self.options.user and path != AUTH:
                    self._token = ""
                    await self._authenticate(deadline - time.monotonic())
                    return await self._call(path, body, max(0.1, deadline - time.monotonic()))
                if code in _UNAVAILABLE:
                    problems.append(f"{endpoint}: {message}")
                    continue
                raise StateError(f"etcd at {endpoint} refused {path}: {message} (code {code})")
            return answer
        raise StoreDown("; ".join(problems) or f"no answer within {within:.1f} s")

    async def _post(
        self, endpoint: Address, path: str, body: dict[str, Any], within: float
    ) -> dict[str, Any]:
        http = self._session()
        if self.options.user and not self._token and path != AUTH:
            await self._authenticate(within)
        headers = {"Authorization": self._token} if self._token else {}
        try:
            async with http.post(
                self._url(endpoint, path),
                json=body,
                headers=headers,
                ssl=self._ssl_arg(),
                timeout=aiohttp.ClientTimeout(total=within),
            ) as response:
                raw = await response.content.read(MAX_ANSWER)
        except TimeoutError:
            raise StoreDown(f"no answer within {within:.2f} s") from None
        except aiohttp.ClientError as exc:
            raise StoreDown(str(exc) or type(exc).__name__) from None
        except OSError as exc:
            raise StoreDown(exc.strerror or str(exc)) from None
        try:
            answer = json.loads(raw)
        except ValueError:
            raise StateError(
                f"etcd at {endpoint} answered {path} with something that is not JSON "
                f"(HTTP {response.status}): is it etcd v3?"
            ) from None
        if not isinstance(answer, dict):
            raise StateError(f"etcd at {endpoint} answered {path} with JSON that is not an object")
        return answer

    async def _authenticate(self, within: float) -> None:
        answer = await self._call(
            AUTH, {"name": self.options.user, "password": self.options.password}, within
        )
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise StateError(f"etcd did not accept user {self.options.user!r}")
        self._token = token

    # ---------------------------------------------------------------- the view

    def _parse_kv(self, kv: dict[str, Any]) -> tuple[str, bytes, int]:
        key = _unb64(kv.get("key"), "etcd key").decode(errors="replace")
        value = _unb64(kv.get("value", ""), key)
        return key, value, _int(kv.get("mod_revision"), f"{key}: mod_revision")

    def _view(self, value: bytes, revision: int) -> Stored:
        try:
            return Stored(View.from_json(json.loads(value)), revision)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StateError(f"etcd key {self.view_key}: not a replicaproxy view: {exc}") from None

    def _member(self, key: str, value: bytes) -> Member | None:
        name = key[len(self.members_prefix) :]
        try:
            info = json.loads(value)
        except (ValueError, UnicodeDecodeError):
            info = None
        if not isinstance(info, dict) or not isinstance(info.get("run"), str):
            log.warning("etcd key %s: not a replicaproxy member entry; ignored", key)
            return None
        return Member(name, info["run"], info)

    async def snapshot(self, within: float = REQUEST_TIMEOUT) -> Snapshot:
        answer = await self._call(
            "/v3/kv/range",
            {"key": _b64(self.prefix + "/"), "range_end": _prefix_end(self.prefix + "/")},
            within,
        )
        revision = _int(answer.get("header", {}).get("revision"), "header revision")
        view: Stored | None = None
        members: dict[str, Member] = {}
        for kv in answer.get("kvs", []):
            key, value, mod = self._parse_kv(kv)
            if key == self.view_key:
                view = self._view(value, mod)
            elif key.startswith(self.members_prefix):
                member = self._member(key, value)
                if member is not None:
                    members[member.name] = member
        return Snapshot(view, members, revision)

    async def swap(
        self, revision: int | None, new: View, within: float = REQUEST_TIMEOUT
    ) -> Stored | None:
        key = _b64(self.view_key)
        compare: dict[str, Any] = (
            {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
            if revision is None
            else {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}
        )
        value = json.dumps(new.to_json(), sort_keys=True)
        answer = await self._call(
            "/v3/kv/txn",
            {
                "compare": [compare],
                "success": [{"request_put": {"key": key, "value": _b64(value)}}],
            },
            within,
        )
        if not answer.get("succeeded", False):
            return None
        return Stored(new, _int(answer.get("header", {}).get("revision"), "header revision"))

    # ------------------------------------------------------------- membership

    async def join(self, member: Member, ttl: float, within: float = REQUEST_TIMEOUT) -> None:
        granted = await self._call("/v3/lease/grant", {"TTL": str(math.ceil(ttl))}, within)
        lease = _int(granted.get("ID"), "lease ID")
        if not lease:
            raise StateError(f"etcd granted no lease: {granted.get('error', granted)}")
        value = json.dumps({**member.info, "run": member.run}, sort_keys=True)
        await self._call(
            "/v3/kv/put",
            {
                "key": _b64(self.members_prefix + member.name),
                "value": _b64(value),
                "lease": str(lease),
            },
            within,
        )
        old, self._lease = self._lease, lease
        if old and old != lease:  # a lease we lost touch with: let it go now if it lives
            with contextlib.suppress(StateError):
                await self._call("/v3/lease/revoke", {"ID": str(old)}, within)

    async def renew(self, within: float) -> bool:
        if not self._lease:
            return False
        answer = await self._call("/v3/lease/keepalive", {"ID": str(self._lease)}, within)
        result = answer.get("result", answer)
        if not isinstance(result, dict) or _int(result.get("TTL"), "lease TTL") <= 0:
            self._lease = 0
            return False
        return True

    async def leave(self, within: float = REQUEST_TIMEOUT) -> None:
        lease, self._lease = self._lease, 0
        if lease:
            await self._call("/v3/lease/revoke", {"ID": str(lease)}, within)

    # ------------------------------------------------------------------ watch

    async def watch(self, after: int) -> AsyncIterator[Change]:
        """Every change under the prefix after revision ``after``; StoreDown when it breaks."""
        http = self._session()
        n = len(self.endpoints)
        body = {
            "create_request": {
                "key": _b64(self.prefix + "/"),
                "range_end": _prefix_end(self.prefix + "/"),
                "start_revision": str(after + 1),
            }
        }
        if self.options.user and not self._token:
            await self._authenticate(REQUEST_TIMEOUT)
        headers = {"Authorization": self._token} if self._token else {}
        endpoint = self.endpoints[self._at % n]
        try:
            async with http.post(
                self._url(endpoint, "/v3/watch"),
                json=body,
                headers=headers,
                ssl=self._ssl_arg(),
                timeout=aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT),
            ) as response:
                async for line in response.content:
                    for change in self._watch_line(line, endpoint):
                        yield change
        except aiohttp.ClientError as exc:
            self._at = (self._at + 1) % n  # next time, another endpoint first
            raise StoreDown(f"watch on {endpoint}: {exc or type(exc).__name__}") from None
        except OSError as exc:
            self._at = (self._at + 1) % n
            raise StoreDown(f"watch on {endpoint}: {exc.strerror or exc}") from None
        raise StoreDown(f"watch on {endpoint}: the stream ended")

    def _watch_line(self, line: bytes, endpoint: Address) -> list[Change]:
        try:
            message = json.loads(line)
        except ValueError:
            raise StoreDown(f"watch on {endpoint}: a line that is not JSON") from None
        if not isinstance(message, dict):
            raise StoreDown(f"watch on {endpoint}: a line that is not a JSON object")
        result = message.get("result")
        if not isinstance(result, dict):
            error = message.get("error", message)
            raise StoreDown(f"watch on {endpoint}: {error}")
        if result.get("canceled"):
            reason = result.get("cancel_reason") or (
                f"compacted past revision {result.get('compact_revision')}"
            )
            raise StoreDown(f"watch on {endpoint} cancelled: {reason}")
        changes: list[Change] = []
        for event in result.get("events", []):
            kv = event.get("kv", {})
            key, value, mod = self._parse_kv(kv)
            deleted = event.get("type") == "DELETE"
            if key == self.view_key:
                if deleted:
                    log.error("etcd key %s was deleted: the view stays as it was", key)
                    continue
                changes.append(Change(view=self._view(value, mod)))
            elif key.startswith(self.members_prefix):
                name = key[len(self.members_prefix) :]
                if deleted:
                    changes.append(Change(gone=name))
                elif (member := self._member(key, value)) is not None:
                    changes.append(Change(member=member))
        return changes

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


AUTH = "/v3/auth/authenticate"
