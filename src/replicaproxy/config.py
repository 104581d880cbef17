"""The typed, frozen configuration tree: TOML loading, validation and flag overrides.

A config is read once (``load_config`` / ``build_config``), validated once, and from then on
is plain frozen data that the server and its parts only read. Every mistake is a
``ConfigError`` whose one-line message starts with where it is: the file, then the key
(``replicaproxy.toml: proxy.replica_buffer: ...``), or the command-line flag
(``--replica: ...``). Unknown keys are rejected, with a suggestion for typos.

File layout (every table and key optional; the result needs exactly one primary)::

    [proxy]       listen, mode, state_file or view_store (and its keys), timeouts, limits,
                  tls_* (TLS for clients)
    [admin]       listen, token, tls_cert, tls_key (no [admin] table: the admin API is off)
    [health]      interval, timeout, fall, rise, send, expect
    [protocol.resp]  ignore, unordered, exact, server_tips (rules for protocol = "resp")
    [[backend]]   name, address, role, sample, tls and tls_* (one table per backend)

TLS files are read at load: a missing one, a key that is not its certificate's, a CA
file without certificates are errors naming the key (see tls.py).

Backends in messages are ``backend 'NAME'`` once their name is known, otherwise
``backend[N]`` with N counted from 1 in file order.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, cast, get_args

from replicaproxy.tls import (
    TLS_VERSIONS,
    FileRole,
    TlsFileError,
    TlsVersion,
    client_context,
    server_context,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = [
    "Address",
    "AdminConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "Divergence",
    "HealthConfig",
    "HttpConfig",
    "Mode",
    "Overrides",
    "PostgresConfig",
    "Protocol",
    "ProtocolConfig",
    "ProxyConfig",
    "RespConfig",
    "Role",
    "build_config",
    "config_from_dict",
    "load_config",
    "parse_address",
    "parse_duration",
    "parse_size",
    "parse_view_store",
]


class ConfigError(Exception):
    """The operator configured something wrong.

    The message is one line that starts with the file and key, or the flag, at fault, e.g.
    ``"config: proxy.replica_buffer: expected a size like '8MiB', got 'lots'"``.
    """


Role = Literal["primary", "replica", "shadow"]
Mode = Literal["async", "sync"]
Divergence = Literal["log", "stale"]
Protocol = Literal["bytes", "resp", "http", "postgres", "memcached"]
StoreLoss = Literal["stop", "serve"]

_ROLES: tuple[str, ...] = get_args(Role)
_MODES: tuple[str, ...] = get_args(Mode)
_DIVERGENCES: tuple[str, ...] = get_args(Divergence)
_PROTOCOLS: tuple[str, ...] = get_args(Protocol)
_STORE_LOSS: tuple[str, ...] = get_args(StoreLoss)


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP address. ``host`` is a host name, an IPv4 address or a bare IPv6 address."""

    host: str
    port: int

    def __str__(self) -> str:
        """``HOST:PORT``, with brackets around IPv6 hosts (``[::1]:5000``)."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream server and the part it plays."""

    name: str
    address: Address
    role: Role
    # Shadows only: the fraction of sessions mirrored to it, 0.0..1.0.
    sample: float = 1.0
    # TLS to this backend (health checks and the proxy's other connections to it too).
    tls: bool = False
    # CA certificates its certificate is checked against; empty: the system's.
    tls_ca: str = ""
    # The name sent (SNI) and checked in its certificate; empty: the address's host.
    tls_server_name: str = ""
    # Mutual TLS: the certificate the proxy presents, and its key (empty: in tls_cert).
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def server_name(self) -> str:
        """The name its certificate must carry (``tls_server_name`` or the address's host)."""
        return self.tls_server_name or self.address.host


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The listener, the data path's timeouts and limits, and the replication mode."""

    # Port 50000: the classroom exercise this project grew out of listened there.
    listen: Address = Address("0.0.0.0", 50000)
    mode: Mode = "async"
    # Relative to the working directory, so a first run in a scratch directory just works.
    state_file: str = "replicaproxy-state.json"
    # A LAN connect takes milliseconds; 2 s leaves room for one lost SYN (Linux's first
    # SYN retransmission is after 1 s) before we fail over at connect.
    connect_timeout: float = 2.0
    # One hour: a round number that keeps quiet interactive sessions open and still
    # reclaims the ones clients forgot. Not measured; tune per protocol.
    idle_timeout: float = 3600.0
    # Docker's default stop timeout is 10 s, so a `docker stop` finds us already done.
    shutdown_grace: float = 10.0
    # How long after the primary's EOF we wait for replicas to confirm it: a few LAN
    # round trips plus scheduling slack. A guess, not a measurement.
    close_grace: float = 0.2
    # Several seconds of a busy session at a few MB/s (about 1 s at tens of MB/s) before a
    # slow replica is dropped; per session and per replica, so memory is bounded by
    # max_connections * replicas * 8 MiB in the worst case.
    replica_buffer: int = 8 * 1024 * 1024
    # The bound on input held for one replica or shadow over all sessions together
    # (replica_buffer bounds one session only: 1000 sessions behind a hung replica would
    # hold 8 GB). 64 MiB: eight sessions a full replica_buffer behind at once, and about
    # what an idle proxy takes (48 MiB resident on the development machine); a backend
    # past it leaves every session (a replica is stale).
    replica_memory: int = 64 * 1024 * 1024
    # Sync mode: a replica this much slower than the primary stalls the client visibly,
    # so it is ejected. Same as connect_timeout for the same reason (one lost packet).
    replica_timeout: float = 2.0
    # A round cap so a connection flood is refused instead of exhausting descriptors.
    # A session holds 1 + (number of backends) fds, so with two backends this needs
    # RLIMIT_NOFILE >= 30000 (systemd's default hard limit is 524288; raise the soft one).
    max_connections: int = 10000
    # 0: availability first, like Kafka's default min.insync.replicas = 1 (which counts
    # the leader). Raise it to refuse sessions that no replica would protect.
    min_in_sync: int = 0
    # A replica whose answers differ may hold different data: it is not promoted
    # (DESIGN.md "Protocols"). "log" reports and keeps it in sync, for shadows-like use.
    divergence: Divergence = "stale"
    # How a session's traffic is compared: "bytes" (byte for byte, any protocol) or a
    # protocol whose replies are compared as messages by its rules (README "Protocols").
    protocol: Protocol = "bytes"
    # Output kept per session to compare a replica with the primary (either may be
    # ahead): several round trips of a chatty protocol, and the largest reply compared
    # in any order (a KEYS or SMEMBERS reply). Replies compared exactly need none of it.
    compare_window: int = 1024 * 1024
    # Async mode: replica and shadow input is written in batches every this often, which
    # saves a system call per request and replica, and bounds how far a replica's input
    # lags behind the primary's (README "How far a replica lags"). 20 ms: one replica
    # at 1.2x HAProxy's CPU per request and 0.9-1.0x its requests/s (bench/README.md,
    # redis-benchmark -c 50), where 5 ms cost 1.4-1.6x; a person does not see 20 ms.
    replica_flush: float = 0.02
    # Client allow-list (CIDRs, IPv4 and IPv6); empty: every client may connect.
    allow: tuple[IPNetwork, ...] = ()
    # Where the view is kept: "file:PATH" or "etcd://HOST:PORT[,HOST:PORT...]/PREFIX";
    # empty: file:state_file, as before there was a choice.
    view_store: str = ""
    # This proxy's name among those sharing a view; empty: HOSTNAME:PORT of the listener.
    name: str = ""
    # The lease a proxy holds in a shared store. 5 s: long enough for two of the three
    # renewals per lease to be lost to a hiccup, short enough that a proxy cut off from
    # etcd stops within seconds (Stolon's proxy checks its store every 5 s as well).
    store_ttl: float = 5.0
    # "stop": a proxy that lost its lease stops serving (it cannot know whether a peer
    # promoted someone else); "serve": it goes on with the view it has.
    on_store_loss: StoreLoss = "stop"
    # TLS to etcd (https when a CA or client certificate is given) and etcd's own users.
    store_ca_file: str = ""
    store_cert_file: str = ""
    store_key_file: str = ""
    store_user: str = ""
    store_password: str = ""
    # TLS for clients: the certificate (PEM, its chain after it) and its key (empty: the
    # key is in tls_cert's file). Empty tls_cert: clients speak plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    # Clients must present a certificate signed by a CA in this file (mutual TLS).
    tls_client_ca: str = ""
    # TLS 1.2: RFC 8996 retired 1.0 and 1.1, and Mozilla's "intermediate" profile (for
    # clients of the last five years or so) starts at 1.2.
    tls_min_version: TlsVersion = "TLSv1.2"

    @property
    def store_url(self) -> str:
        """The view store in force: ``view_store``, or the state file's ``file:`` URL."""
        return self.view_store or f"file:{self.state_file}"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin HTTP API. ``listen is None`` means the API is off."""

    listen: Address | None = None
    token: str = ""
    # HTTPS: the certificate and its key (empty: in tls_cert's file); empty: plain HTTP.
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active health checks: TCP connect, optionally send bytes and expect bytes back."""

    # 1 s interval with fall = 3 notices a dead backend in about 3 s; HAProxy's defaults
    # (inter 2s, fall 3, rise 2) are the model, halved because we fail over on it.
    interval: float = 1.0
    # A check slower than its interval would overlap the next one.
    timeout: float = 1.0
    fall: int = 3
    rise: int = 2
    send: bytes = b""
    expect: bytes = b""


@dataclass(frozen=True, slots=True)
class RespConfig:
    """Rules for ``protocol = "resp"``, on top of the server's tips and the built-in ones.

    Each entry names a command (``"GET"``), a subcommand (``"CONFIG GET"``) or every
    subcommand (``"CLIENT *"``), case-insensitively.
    """

    #: Replies that may differ in any way (compared only for where they end).
    ignore: tuple[str, ...] = ()
    #: Replies whose elements may come in any order.
    unordered: tuple[str, ...] = ()
    #: Replies compared byte for byte, whatever the other rules say.
    exact: tuple[str, ...] = ()
    #: Read COMMAND's tips from the primary (Redis 7) to learn which replies may differ.
    server_tips: bool = True


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Rules for ``protocol = "http"``."""

    #: Response headers whose values may differ (names, any case). Date: each server's
    #: clock, and a second boundary between primary and replica is common.
    ignore_headers: tuple[str, ...] = ("date",)


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """Rules for ``protocol = "postgres"``."""

    #: ParameterStatus messages (by parameter name) whose values may differ.
    ignore_parameters: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """The ``[protocol.NAME]`` tables: each protocol's rules."""

    resp: RespConfig = RespConfig()
    http: HttpConfig = HttpConfig()
    postgres: PostgresConfig = PostgresConfig()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. Built by ``load_config``/``build_config``, never mutated."""

    proxy: ProxyConfig
    admin: AdminConfig
    health: HealthConfig
    backends: tuple[BackendConfig, ...]
    protocols: ProtocolConfig = ProtocolConfig()

    @property
    def primary(self) -> BackendConfig:
        """The backend configured as primary (validation guarantees exactly one)."""
        for backend in self.backends:
            if backend.role == "primary":
                return backend
        raise ValueError("config has no primary backend")

    def backend(self, name: str) -> BackendConfig:
        """The backend called ``name``; ``KeyError`` if there is none."""
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line flags that override the file. ``None`` or empty means not given."""

    listen: str | None = None
    primary: str | None = None
    replicas: tuple[str, ...] = ()
    shadows: tuple[str, ...] = ()
    mode: str | None = None
    admin: str | None = None
    state_file: str | None = None
    protocol: str | None = None
    view_store: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


# The admin API listens on loopback unless told otherwise; 9901 is Envoy's admin port,
# a convention operators of proxies already know.
_DEFAULT_ADMIN_LISTEN = Address("127.0.0.1", 9901)
# A smaller replica buffer would overflow on ordinary single writes.
_MIN_REPLICA_BUFFER = 1024
# Event-loop timers need a finite, representable delay; ~31 years is "never" enough.
_MAX_DURATION = 1_000_000_000.0


# --------------------------------------------------------------------------- scalars


def parse_address(text: str, *, where: str, allow_zero: bool = False) -> Address:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``.

    Port 0 (pick any free port) is accepted only with ``allow_zero`` (listen addresses).
    IPv6 hosts are normalised to their compressed form, so equal addresses compare equal.
    Raises ``ConfigError`` starting with ``where``.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected an address like 'HOST:PORT', got {_show(text)}")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{where}: expected '[IPV6]:PORT', got {_show(text)}")
        if "%" in host:
            raise ConfigError(f"{where}: IPv6 zone ids are not supported, got {_show(text)}")
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise ConfigError(
                f"{where}: {_show(host)} is not an IPv6 address, in {_show(text)}"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{where}: expected 'HOST:PORT', missing ':PORT' in {_show(text)}")
        if not host:
            raise ConfigError(f"{where}: expected 'HOST:PORT', missing HOST in {_show(text)}")
        if ":" in host:
            raise ConfigError(
                f"{where}: IPv6 addresses need brackets, like '[::1]:5000', got {_show(text)}"
            )
        if not _HOSTNAME.fullmatch(host):
            raise ConfigError(
                f"{where}: {_show(host)} is not a host name or IP address, in {_show(text)}"
            )
        if _DOTTED_DIGITS.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ConfigError(
                    f"{where}: {_show(host)} is not an IPv4 address, in {_show(text)}"
                ) from None
    if not _PORT.fullmatch(port_text):
        raise ConfigError(f"{where}: port must be a number, got {_show(text)}")
    port = int(port_text)
    lowest = 0 if allow_zero else 1
    if not lowest <= port <= 65535:
        raise ConfigError(f"{where}: port must be {lowest}..65535, got {_show(text)}")
    return Address(host, port)


def parse_duration(value: object, *, where: str) -> float:
    """Parse a duration in seconds: a number, or a string like ``"500ms"``, ``"2s"``,
    ``"1.5s"``, ``"1m"``, ``"1h"``. Negative, non-finite and boolean values are errors."""
    expected = f"{where}: expected a duration like '2s', '500ms' or a number of seconds"
    if isinstance(value, bool):
        raise ConfigError(f"{expected}, got {_show(value)}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite duration, got {_show(value)}")
        amount = Fraction(value)
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise ConfigError(f"{expected}, got {_show(value)}")
        amount = Fraction(match[1]) * _DURATION_UNITS[match[2]]
    else:
        raise ConfigError(f"{expected}, got {_show(value)}")
    if amount < 0:
        raise ConfigError(f"{where}: must not be negative, got {_show(value)}")
    if amount > _MAX_DURATION:
        raise ConfigError(f"{where}: must be at most {_MAX_DURATION:.0f}s, got {_show(value)}")
    return float(amount)


def parse_size(value: object, *, where: str) -> int:
    """Parse a size in bytes: an integer, or a string like ``"512B"``, ``"64KiB"``,
    ``"8MiB"``, ``"1GiB"`` (powers of 1024) or ``"10kB"``/``"10KB"``, ``"MB"``, ``"GB"``
    (powers of 1000). Negative, fractional-byte and boolean values are errors."""
    expected = f"{where}: expected a size like '8MiB', got {_show(value)}"
    if isinstance(value, bool):
        raise ConfigError(expected)
    if isinstance(value, int):
        amount = Fraction(value)
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ConfigError(expected)
        amount = Fraction(match[1]) * _SIZE_UNITS[match[2]]
    else:
        raise ConfigError(expected)
    if amount < 0:
        raise ConfigError(f"{where}: must not be negative, got {_show(value)}")
    if amount.denominator != 1:
        raise ConfigError(f"{where}: not a whole number of bytes, got {_show(value)}")
    return int(amount)


_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_DOTTED_DIGITS = re.compile(r"[0-9.]+")
_PORT = re.compile(r"[0-9]{1,5}")
# Bounded digit counts keep Fraction/int far from Python's int-string limits.
_DURATION = re.compile(r"([+-]?(?:[0-9]{1,15}(?:\.[0-9]{0,15})?|\.[0-9]{1,15}))\s*(ms|s|m|h)")
_DURATION_UNITS = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
_SIZE = re.compile(r"([+-]?[0-9]{1,20}(?:\.[0-9]{1,20})?)\s*(B|KiB|MiB|GiB|kB|KB|MB|GB)")
_SIZE_UNITS = {
    "B": Fraction(1),
    "KiB": Fraction(1024),
    "MiB": Fraction(1024**2),
    "GiB": Fraction(1024**3),
    "kB": Fraction(1000),
    "KB": Fraction(1000),
    "MB": Fraction(1000**2),
    "GB": Fraction(1000**3),
}
_NAME = re.compile(r"[A-Za-z0-9_.:\[\]-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # (an HTTP token: RFC 9110)
_COMMAND = re.compile(r"[A-Za-z0-9_.:|-]+(?:\s+(?:[A-Za-z0-9_.:|-]+|\*))?")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _show(value: object) -> str:
    """A short, one-line rendering of a config value for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _fmt_key(key: object) -> str:
    """A key as TOML would spell it: bare when it can be, quoted (and one line) otherwise."""
    text = key if isinstance(key, str) else str(key)
    return text if _BARE_KEY.fullmatch(text) else json.dumps(text)


def _one_of(options: Iterable[str]) -> str:
    quoted = [repr(option) for option in options]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _choice(value: object, where: str, options: tuple[str, ...]) -> str:
    if isinstance(value, str) and value in options:
        return value
    raise ConfigError(f"{where}: expected {_one_of(options)}, got {_show(value)}")


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {_show(value)}")
    return value


def _path(value: object, where: str) -> str:
    text = _string(value, where)
    if not text or "\0" in text:
        raise ConfigError(f"{where}: expected a file path, got {_show(value)}")
    return text


def _bytes(value: object, where: str) -> bytes:
    try:
        return _string(value, where).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: not encodable as UTF-8, got {_show(value)}") from None


def _integer(value: object, where: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    if value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, got {_show(value)}")
    return value


def _duration(value: object, where: str, *, positive: bool) -> float:
    seconds = parse_duration(value, where=where)
    if positive and seconds <= 0:
        raise ConfigError(f"{where}: must be more than 0, got {_show(value)}")
    return seconds


def _address(value: object, where: str, *, allow_zero: bool) -> Address:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string like 'HOST:PORT', got {_show(value)}")
    return parse_address(value, where=where, allow_zero=allow_zero)


def _replica_buffer(value: object, where: str) -> int:
    size = parse_size(value, where=where)
    if size < _MIN_REPLICA_BUFFER:
        raise ConfigError(f"{where}: must be at least 1KiB, got {_show(value)}")
    return size


def _names(value: object, where: str, what: str) -> tuple[str, ...]:
    """A list of header or parameter names, compared in lowercase."""
    if not isinstance(value, list):
        raise ConfigError(
            f'{where}: expected a list of {what} names like ["date"], got {_show(value)}'
        )
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _TOKEN.fullmatch(item):
            raise ConfigError(f"{where}[{i}]: expected a {what} name, got {_show(item)}")
        out.append(item.lower())
    return tuple(out)


def _boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    return value


def _commands(value: object, where: str) -> tuple[str, ...]:
    """A list of command names: ``["GET", "CONFIG GET", "CLIENT *"]``."""
    if not isinstance(value, list):
        raise ConfigError(f'{where}: expected a list of commands like ["INFO"], got {_show(value)}')
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _COMMAND.fullmatch(item.strip()):
            raise ConfigError(
                f"{where}[{i}]: expected a command, a command and subcommand, or a command "
                f'and * (like "INFO", "CONFIG GET", "CLIENT *"), got {_show(item)}'
            )
        out.append(" ".join(item.split()).upper())
    return tuple(out)


def _sample(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number from 0.0 to 1.0, got {_show(value)}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ConfigError(f"{where}: must be from 0.0 to 1.0, got {_show(value)}")
    return float(value)


def _networks(value: object, where: str) -> tuple[IPNetwork, ...]:
    """A list of CIDRs like ``["10.0.0.0/8", "::1/128"]`` (a bare address is a /32 or /128)."""
    if not isinstance(value, list):
        raise ConfigError(
            f'{where}: expected a list of CIDRs like ["10.0.0.0/8"], got {_show(value)}'
        )
    out: list[IPNetwork] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{where}[{i}]: expected a CIDR string, got {_show(item)}")
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as exc:
            raise ConfigError(f"{where}[{i}]: not a CIDR: {item!r} ({exc})") from None
    return tuple(out)


def _view_store(value: object, where: str) -> str:
    """``file:PATH`` or ``etcd://HOST:PORT[,HOST:PORT...]/PREFIX``."""
    text = _string(value, where)
    if not text:
        return text  # the state file
    if text.startswith("file:"):
        _path(text[len("file:") :], where)
        return text
    if text.startswith("etcd://"):
        from replicaproxy.etcd import parse_etcd_url

        parse_etcd_url(text, where=where)
        return text
    raise ConfigError(
        f"{where}: expected 'file:PATH' or 'etcd://HOST:PORT[,HOST:PORT...]/PREFIX', "
        f"got {_show(value)}"
    )


def parse_view_store(text: str, *, where: str) -> str:
    """Check a ``view_store`` URL (``file:PATH`` or ``etcd://...``); ConfigError names ``where``."""
    return _view_store(text, where)


def _proxy_name(value: object, where: str) -> str:
    text = _string(value, where)
    if text and not _NAME.fullmatch(text):
        raise ConfigError(
            f"{where}: expected a name of letters, digits and _ . : [ ] -, got {_show(value)}"
        )
    return text


# etcd leases are whole seconds, and etcd grants no less than its election timeout x 1.5
# (1.5 s by default): below 1 s a lease would not outlive one renewal.
_MIN_STORE_TTL = 1.0


def _store_ttl(value: object, where: str) -> float:
    seconds = _duration(value, where, positive=True)
    if seconds < _MIN_STORE_TTL:
        raise ConfigError(f"{where}: must be at least 1s, got {_show(value)}")
    return seconds


def _readable(value: object, where: str) -> str:
    """A file the proxy can read ("" for none)."""
    if value == "":
        return ""
    text = _path(value, where)
    try:
        with open(text, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {text!r}: {exc.strerror or exc}") from None
    return text


def _check_store(proxy: ProxyConfig, source: str) -> None:
    """The view store's keys that only make sense together."""
    etcd = proxy.store_url.startswith("etcd://")
    for key in ("store_ca_file", "store_cert_file", "store_key_file", "store_user",
                "store_password"):  # fmt: skip
        if getattr(proxy, key) and not etcd:
            raise ConfigError(
                f"{source}: proxy.{key}: only used with an etcd view_store "
                f"(view_store is {proxy.store_url!r})"
            )
    if proxy.store_key_file and not proxy.store_cert_file:
        raise ConfigError(f"{source}: proxy.store_key_file: needs proxy.store_cert_file too")
    if bool(proxy.store_user) != bool(proxy.store_password):
        key = "store_password" if proxy.store_user else "store_user"
        raise ConfigError(f"{source}: proxy.{key}: store_user and store_password go together")


def _server_name(value: object, where: str) -> str:
    """A name to check a backend's certificate against: a DNS name or an IP address."""
    text = _string(value, where)
    if text and not _HOSTNAME.fullmatch(text):
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(
                f"{where}: expected a host name or IP address, got {_show(value)}"
            ) from None
    return text


def _tls_flag(value: str, flag: str) -> str:
    """A file given by flag: a path (not empty) the proxy can read."""
    return _readable(_path(value, flag), flag)


def _tls_key_at_fault(role: FileRole, keys: Mapping[FileRole, str], key_file: str) -> str:
    """The key to name for a TLS file error: a key missing from its own file is the
    certificate file's fault when no key file was given (the key goes in it then)."""
    if role == "key" and not key_file:
        return keys["cert"]
    return keys[role]


def _check_backend_tls(entry: _Entry) -> None:
    """A backend's tls_* keys: only with tls = true, and files that make a context."""
    b = entry.backend
    if not b.tls:
        for key in _BACKEND_TLS_KEYS:
            if key != "tls" and getattr(b, key):
                raise ConfigError(f"{entry.key(key)}: only used with tls = true")
        return
    if b.tls_key and not b.tls_cert:
        raise ConfigError(f"{entry.key('tls_key')}: needs tls_cert too (mutual TLS)")
    try:
        client_context(ca=b.tls_ca, cert=b.tls_cert, key=b.tls_key)
    except TlsFileError as exc:
        keys: dict[FileRole, str] = {"cert": "tls_cert", "key": "tls_key", "ca": "tls_ca"}
        key = _tls_key_at_fault(exc.role, keys, b.tls_key)
        raise ConfigError(f"{entry.key(key)}: {exc.message}") from None


def _check_proxy_tls(draft: _Draft) -> None:
    """``proxy.tls_*`` (or their flags): whole, and files that make a server context."""
    p = draft.proxy

    def where(key: str) -> str:
        return draft.tls_flags.get(key) or f"{draft.source}: proxy.{key}"

    if not p.tls_cert:
        for key in ("tls_key", "tls_client_ca"):
            if getattr(p, key):
                raise ConfigError(
                    f"{where(key)}: needs proxy.tls_cert (or --tls-cert): without a "
                    "certificate clients speak plaintext"
                )
        return
    try:
        server_context(
            p.tls_cert, p.tls_key, client_ca=p.tls_client_ca, min_version=p.tls_min_version
        )
    except TlsFileError as exc:
        keys: dict[FileRole, str] = {"cert": "tls_cert", "key": "tls_key", "ca": "tls_client_ca"}
        raise ConfigError(
            f"{where(_tls_key_at_fault(exc.role, keys, p.tls_key))}: {exc.message}"
        ) from None


def _check_admin_tls(draft: _Draft) -> None:
    """``admin.tls_*``: whole, and files that make a server context."""
    a = draft.admin
    where = f"{draft.source}: admin"
    if not a.tls_cert:
        if a.tls_key:
            raise ConfigError(f"{where}.tls_key: needs admin.tls_cert")
        return
    try:
        server_context(a.tls_cert, a.tls_key)
    except TlsFileError as exc:
        keys: dict[FileRole, str] = {"cert": "tls_cert", "key": "tls_key", "ca": "tls_cert"}
        raise ConfigError(
            f"{where}.{_tls_key_at_fault(exc.role, keys, a.tls_key)}: {exc.message}"
        ) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_own_listen(backend: Address, listen: Address) -> bool:
    """Whether connecting to ``backend`` reaches the proxy's own listener."""
    if listen.port == 0 or backend.port != listen.port:
        return False
    host = backend.host.lower()
    if host == listen.host.lower():
        return True
    # Listening on every address of the machine: any loopback address reaches it.
    return listen.host in ("0.0.0.0", "::", "") and is_loopback(host)


# --------------------------------------------------------------------------- tables

_Parser = Callable[[object, str], Any]

_PROXY_KEYS: dict[str, _Parser] = {
    "listen": lambda v, w: _address(v, w, allow_zero=True),
    "mode": lambda v, w: _choice(v, w, _MODES),
    "state_file": _path,
    "connect_timeout": lambda v, w: _duration(v, w, positive=True),
    "idle_timeout": lambda v, w: _duration(v, w, positive=True),
    "shutdown_grace": lambda v, w: _duration(v, w, positive=False),
    "close_grace": lambda v, w: _duration(v, w, positive=False),
    "replica_buffer": _replica_buffer,
    "replica_memory": _replica_buffer,
    "replica_timeout": lambda v, w: _duration(v, w, positive=True),
    "max_connections": lambda v, w: _integer(v, w, minimum=1),
    "min_in_sync": lambda v, w: _integer(v, w, minimum=0),
    "divergence": lambda v, w: _choice(v, w, _DIVERGENCES),
    "allow": _networks,
    "replica_flush": lambda v, w: _duration(v, w, positive=False),
    "protocol": lambda v, w: _choice(v, w, _PROTOCOLS),
    "compare_window": _replica_buffer,
    "view_store": _view_store,
    "name": _proxy_name,
    "store_ttl": _store_ttl,
    "on_store_loss": lambda v, w: _choice(v, w, _STORE_LOSS),
    "store_ca_file": _readable,
    "store_cert_file": _readable,
    "store_key_file": _readable,
    "store_user": _string,
    "store_password": _string,
    "tls_cert": _readable,
    "tls_key": _readable,
    "tls_client_ca": _readable,
    "tls_min_version": lambda v, w: _choice(v, w, TLS_VERSIONS),
}
_ADMIN_KEYS: dict[str, _Parser] = {
    "listen": lambda v, w: _address(v, w, allow_zero=True),
    "token": _string,
    "tls_cert": _readable,
    "tls_key": _readable,
}
_HEALTH_KEYS: dict[str, _Parser] = {
    "interval": lambda v, w: _duration(v, w, positive=True),
    "timeout": lambda v, w: _duration(v, w, positive=True),
    "fall": lambda v, w: _integer(v, w, minimum=1),
    "rise": lambda v, w: _integer(v, w, minimum=1),
    "send": _bytes,
    "expect": _bytes,
}
_BACKEND_TLS_KEYS: dict[str, _Parser] = {
    "tls": _boolean,
    "tls_ca": _readable,
    "tls_server_name": _server_name,
    "tls_cert": _readable,
    "tls_key": _readable,
}
_BACKEND_KEYS = ("name", "address", "role", "sample", *_BACKEND_TLS_KEYS)
_RESP_KEYS: dict[str, _Parser] = {
    "ignore": _commands,
    "unordered": _commands,
    "exact": _commands,
    "server_tips": _boolean,
}
#: [protocol.NAME] tables, by protocol.
_HTTP_KEYS: dict[str, _Parser] = {"ignore_headers": lambda v, w: _names(v, w, "header")}
_POSTGRES_KEYS: dict[str, _Parser] = {
    "ignore_parameters": lambda v, w: _names(v, w, "parameter"),
}
_PROTOCOL_TABLES: dict[str, dict[str, _Parser]] = {
    "resp": _RESP_KEYS,
    "http": _HTTP_KEYS,
    "postgres": _POSTGRES_KEYS,
}
_TABLES: dict[str, Iterable[str]] = {
    "proxy": _PROXY_KEYS,
    "admin": _ADMIN_KEYS,
    "health": _HEALTH_KEYS,
    "protocol": _PROTOCOL_TABLES,
    "backend": _BACKEND_KEYS,
}


def _reject_unknown(table: Mapping[Any, object], known: Iterable[str], where: str) -> None:
    """Raise for the first key of ``table`` not in ``known``, suggesting a close match."""
    known = list(known)
    for key in table:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else []
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        raise ConfigError(f"{where}.{_fmt_key(key)}: unknown key ({hint})")


def _reject_unknown_top(data: Mapping[Any, object], source: str) -> None:
    for key in data:
        if key in _TABLES:
            continue
        hint = f"known tables: {', '.join(_TABLES)}"
        if isinstance(key, str):
            # A top-level `listen = ...` usually means a forgotten [proxy] header.
            nested = [f"{table}.{name}" for table, names in _TABLES.items() for name in names]
            by_leaf: dict[str, str] = {}
            for dotted in nested:
                by_leaf.setdefault(dotted.partition(".")[2], dotted)
            if key in by_leaf:
                hint = f"did you mean {by_leaf[key]!r}?"
            elif close := difflib.get_close_matches(key, list(_TABLES), n=1):
                hint = f"did you mean {close[0]!r}?"
        raise ConfigError(f"{source}: {_fmt_key(key)}: unknown key ({hint})")


def _table(data: Mapping[Any, object], name: str, source: str) -> Mapping[Any, object]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {name}: expected a table ([{name}]), got {_show(value)}")
    return value


def _parse_table(
    table: Mapping[Any, object], keys: dict[str, _Parser], where: str
) -> dict[str, Any]:
    _reject_unknown(table, keys, where)
    return {key: keys[key](value, f"{where}.{key}") for key, value in table.items()}


@dataclass(slots=True)
class _Entry:
    """A backend on its way into the config, with how messages should point at it."""

    backend: BackendConfig
    where: str  # message prefix: "FILE: backend 'mv2'" (or "FILE: backend[3]"), or a flag
    index_where: str  # "FILE: backend[3]", or the flag
    ref: str  # how other messages name it: "backend 'mv2'", "backend[3]", or the flag
    index_ref: str  # "backend[3]", or the flag
    from_flag: bool = False

    def key(self, name: str) -> str:
        """Where to point a message about this backend's key ``name``."""
        return self.where if self.from_flag else f"{self.where}.{name}"


@dataclass(slots=True)
class _Draft:
    """The file parsed table by table, before flags and the cross-table checks."""

    source: str
    proxy: ProxyConfig
    admin: AdminConfig
    health: HealthConfig
    backends: list[_Entry] = field(default_factory=list)
    admin_from_flag: bool = False
    protocols: ProtocolConfig = ProtocolConfig()
    tls_flags: dict[str, str] = field(default_factory=dict)  # proxy.tls_* key: the flag


def _parse_backends(value: object, source: str) -> list[_Entry]:
    if not isinstance(value, list):
        raise ConfigError(
            f"{source}: backend: expected an array of tables ([[backend]]), got {_show(value)}"
        )
    entries = []
    for number, item in enumerate(value, start=1):
        index_ref = f"backend[{number}]"
        index_where = f"{source}: {index_ref}"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{index_where}: expected a table, got {_show(item)}")
        name: str | None = None
        if "name" in item:
            name = _string(item["name"], f"{index_where}.name")
            if not _NAME.fullmatch(name):
                raise ConfigError(
                    f"{index_where}.name: expected a non-empty name of letters, digits and "
                    f"_ . : [ ] -, got {_show(name)}"
                )
        ref = f"backend {name!r}" if name is not None else index_ref
        where = f"{source}: {ref}"
        _reject_unknown(item, _BACKEND_KEYS, where)
        if "address" not in item:
            raise ConfigError(f"{where}.address: required")
        address = _address(item["address"], f"{where}.address", allow_zero=False)
        role = cast(Role, _choice(item.get("role", "replica"), f"{where}.role", _ROLES))
        sample = 1.0
        if "sample" in item:
            if role != "shadow":
                raise ConfigError(
                    f"{where}.sample: only shadows are sampled, this backend's role is {role!r}"
                )
            sample = _sample(item["sample"], f"{where}.sample")
        tls = {
            key: parse(item[key], f"{where}.{key}")
            for key, parse in _BACKEND_TLS_KEYS.items()
            if key in item
        }
        backend = BackendConfig(
            name=str(address) if name is None else name,
            address=address,
            role=role,
            sample=sample,
            **tls,
        )
        entry = _Entry(backend, where, index_where, ref, index_ref)
        _check_backend_tls(entry)
        entries.append(entry)
    return entries


def _parse(data: Mapping[str, object], source: str) -> _Draft:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table at the top level, got {_show(data)}")
    _reject_unknown_top(data, source)
    proxy = ProxyConfig(
        **_parse_table(_table(data, "proxy", source), _PROXY_KEYS, f"{source}: proxy")
    )
    health = HealthConfig(
        **_parse_table(_table(data, "health", source), _HEALTH_KEYS, f"{source}: health")
    )
    admin = AdminConfig()
    if "admin" in data:
        # An [admin] table turns the API on, on loopback unless it says where.
        fields = _parse_table(_table(data, "admin", source), _ADMIN_KEYS, f"{source}: admin")
        admin = AdminConfig(**{"listen": _DEFAULT_ADMIN_LISTEN, **fields})
    backends = _parse_backends(data.get("backend", []), source)
    protocols = _parse_protocols(_table(data, "protocol", source), source)
    return _Draft(source, proxy, admin, health, backends, protocols=protocols)


def _protocol_table(
    table: Mapping[Any, object], name: str, source: str
) -> tuple[dict[str, Any], str]:
    where = f"{source}: protocol.{name}"
    value = table.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table ([protocol.{name}]), got {_show(value)}")
    return _parse_table(value, _PROTOCOL_TABLES[name], where), where


def _parse_protocols(table: Mapping[Any, object], source: str) -> ProtocolConfig:
    _reject_unknown(table, _PROTOCOL_TABLES, f"{source}: protocol")
    http = HttpConfig(**_protocol_table(table, "http", source)[0])
    postgres = PostgresConfig(**_protocol_table(table, "postgres", source)[0])
    resp = RespConfig()
    if "resp" in table:
        fields, where = _protocol_table(table, "resp", source)
        resp = RespConfig(**fields)
        seen: dict[str, str] = {}
        for kind in ("ignore", "unordered", "exact"):
            for name in getattr(resp, kind):
                if name in seen:
                    raise ConfigError(
                        f"{where}.{kind}: {name!r} is also in protocol.resp.{seen[name]}"
                    )
                seen[name] = kind
    return ProtocolConfig(resp=resp, http=http, postgres=postgres)


def _finish(draft: _Draft, missing_primary: str) -> Config:
    """The checks that span tables or backends, then the frozen Config."""
    source = draft.source
    by_address: dict[tuple[str, int], _Entry] = {}
    by_name: dict[str, _Entry] = {}
    # File entries first, so a clash between the file and a flag is blamed on the flag.
    for entry in sorted(draft.backends, key=lambda e: e.from_flag):
        address = entry.backend.address
        # Host names are case-insensitive; IPv6 hosts are already normalised.
        address_key = (address.host.lower(), address.port)
        if (first := by_address.get(address_key)) is not None:
            raise ConfigError(f"{entry.key('address')}: {address} is already used by {first.ref}")
        by_address[address_key] = entry
        if _is_own_listen(address, draft.proxy.listen):
            raise ConfigError(
                f"{entry.key('address')}: {address} is the proxy's own listen address "
                f"({draft.proxy.listen}): the proxy would connect to itself without end"
            )
        name = entry.backend.name
        if (first := by_name.get(name)) is not None:
            where = entry.where if entry.from_flag else f"{entry.index_where}.name"
            raise ConfigError(f"{where}: duplicate name {name!r} (also {first.index_ref})")
        by_name[name] = entry

    primaries = [entry for entry in draft.backends if entry.backend.role == "primary"]
    if not primaries:
        raise ConfigError(missing_primary)
    if len(primaries) > 1:
        raise ConfigError(
            f"{primaries[1].where}: a second primary (the first is {primaries[0].backend.name!r})"
        )

    replicas = sum(1 for entry in draft.backends if entry.backend.role == "replica")
    if draft.proxy.min_in_sync > replicas:
        raise ConfigError(
            f"{source}: proxy.min_in_sync: {draft.proxy.min_in_sync} is more than the number "
            f"of replicas ({replicas})"
        )

    _check_store(draft.proxy, source)
    _check_proxy_tls(draft)
    _check_admin_tls(draft)

    listen = draft.admin.listen
    if listen is not None and not is_loopback(listen.host) and not draft.admin.token.strip():
        if draft.admin_from_flag:
            raise ConfigError(
                f"--admin: admin.token in the config file is required when the admin API is "
                f"not on a loopback address ({listen})"
            )
        raise ConfigError(
            f"{source}: admin.token: required when admin.listen is not a loopback address "
            f"({listen})"
        )

    return Config(
        proxy=draft.proxy,
        admin=draft.admin,
        health=draft.health,
        backends=tuple(entry.backend for entry in draft.backends),
        protocols=draft.protocols,
    )


def _no_primary(source: str) -> str:
    return f'{source}: backend: no backend has role = "primary"'


# --------------------------------------------------------------------------- entry points


def config_from_dict(data: Mapping[str, object], *, source: str = "config") -> Config:
    """Validate parsed TOML data (``tomllib`` output or an equivalent dict) into a Config.

    ``source`` names where the data came from and starts every error message.
    """
    return _finish(_parse(data, source), _no_primary(source))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {error.start})") from None
    try:
        return tomllib.loads(text)
    except ValueError as error:  # TOMLDecodeError; its message has the line and column
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a TOML config file. Every failure is a ``ConfigError``."""
    path = Path(path)
    return config_from_dict(_read_toml(path), source=str(path))


def build_config(path: str | Path | None, overrides: Overrides) -> Config:
    """The config file (if any) with command-line flags applied on top, then validated.

    ``--listen``, ``--mode``, ``--admin``, ``--state-file``, ``--view-store`` replace the
    file's values (``--state-file PATH`` is short for ``--view-store file:PATH``).
    ``--primary`` replaces the file's primary (a flag-given backend is named by its
    ``HOST:PORT``; if the address is the file's primary's own, that backend is kept as is).
    Each ``--replica``/``--shadow`` adds a backend named by its ``HOST:PORT``.
    """
    if path is None:
        draft = _parse({}, "config")
        missing_primary = "--primary: required (or give --config with a primary backend)"
    else:
        path = Path(path)
        draft = _parse(_read_toml(path), str(path))
        missing_primary = f"{_no_primary(str(path))} (or give --primary)"
    _apply(draft, overrides)
    return _finish(draft, missing_primary)


def _flag_entry(text: str, flag: str, role: Role) -> _Entry:
    address = parse_address(text, where=flag)
    backend = BackendConfig(name=str(address), address=address, role=role)
    return _Entry(backend, flag, flag, flag, flag, from_flag=True)


def _apply(draft: _Draft, overrides: Overrides) -> None:
    proxy = draft.proxy
    if overrides.listen is not None:
        listen = parse_address(overrides.listen, where="--listen", allow_zero=True)
        proxy = replace(proxy, listen=listen)
    if overrides.mode is not None:
        proxy = replace(proxy, mode=cast(Mode, _choice(overrides.mode, "--mode", _MODES)))
    if overrides.state_file is not None and overrides.view_store is not None:
        raise ConfigError("--state-file: give --view-store or --state-file, not both")
    if overrides.state_file is not None:
        state_file = _path(overrides.state_file, "--state-file")
        proxy = replace(proxy, state_file=state_file, view_store=f"file:{state_file}")
    if overrides.protocol is not None:
        protocol = cast(Protocol, _choice(overrides.protocol, "--protocol", _PROTOCOLS))
        proxy = replace(proxy, protocol=protocol)
    if overrides.view_store is not None:
        proxy = replace(proxy, view_store=_view_store(overrides.view_store, "--view-store"))
    if overrides.tls_cert is not None:
        proxy = replace(proxy, tls_cert=_tls_flag(overrides.tls_cert, "--tls-cert"))
        draft.tls_flags["tls_cert"] = "--tls-cert"
    if overrides.tls_key is not None:
        proxy = replace(proxy, tls_key=_tls_flag(overrides.tls_key, "--tls-key"))
        draft.tls_flags["tls_key"] = "--tls-key"
    draft.proxy = proxy
    if overrides.admin is not None:
        admin_listen = parse_address(overrides.admin, where="--admin", allow_zero=True)
        draft.admin = replace(draft.admin, listen=admin_listen)
        draft.admin_from_flag = True
    if overrides.primary is not None:
        new = _flag_entry(overrides.primary, "--primary", "primary")
        position = next((i for i, e in enumerate(draft.backends) if e.backend.role == "primary"), 0)
        old = [e for e in draft.backends if e.backend.role == "primary"]
        # Same address as the file's primary: keep its name (the persisted view uses it).
        if len(old) != 1 or old[0].backend.address != new.backend.address:
            draft.backends = [e for e in draft.backends if e.backend.role != "primary"]
            draft.backends.insert(position, new)
    for text in overrides.replicas:
        draft.backends.append(_flag_entry(text, "--replica", "replica"))
    for text in overrides.shadows:
        draft.backends.append(_flag_entry(text, "--shadow", "shadow"))
