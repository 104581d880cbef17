"""Tests for replicaproxy.config: parsing, validation messages, flag overrides, round trips."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicaproxy.config import (
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    ConfigError,
    HealthConfig,
    Overrides,
    ProxyConfig,
    build_config,
    config_from_dict,
    load_config,
    parse_address,
    parse_duration,
    parse_size,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "replicaproxy.toml"
PRIMARY = {"name": "a", "address": "127.0.0.1:1", "role": "primary"}


def with_primary(**tables: Any) -> dict[str, Any]:
    """A minimal valid config dict (one primary) plus the given tables."""
    data: dict[str, Any] = {"backend": [PRIMARY]}
    data.update(tables)
    return data


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- example file


def test_example_file_loads_with_expected_values() -> None:
    config = load_config(EXAMPLE)
    assert config.proxy == ProxyConfig()  # the example documents the defaults
    assert config.proxy.replica_buffer == 8 * 1024 * 1024
    assert config.proxy.replica_memory == 64 * 1024 * 1024
    assert config.admin == AdminConfig(listen=Address("127.0.0.1", 9901), token="")
    assert config.health == HealthConfig()
    assert config.backends == (
        BackendConfig("mv1", Address("127.0.0.1", 50001), "primary"),
        BackendConfig("mv2", Address("127.0.0.1", 50002), "replica"),
    )
    assert config.primary.name == "mv1"
    assert config.backend("mv2").address == Address("127.0.0.1", 50002)


def test_example_file_shows_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    for table, cls in (("proxy", ProxyConfig), ("admin", AdminConfig), ("health", HealthConfig)):
        assert set(data[table]) == {f.name for f in dataclasses.fields(cls)}, table
    commented = EXAMPLE.read_text(encoding="utf-8")
    backend_keys = {"name", "address", "role", "sample"}
    backend_keys |= {f"tls{rest}" for rest in ("", "_ca", "_server_name", "_cert", "_key")}
    assert backend_keys == {f.name for f in dataclasses.fields(BackendConfig)}
    for key in backend_keys:
        assert f"{key} = " in commented


def test_defaults_with_only_a_primary() -> None:
    config = config_from_dict({"backend": [{"address": "127.0.0.1:1", "role": "primary"}]})
    assert config.proxy == ProxyConfig()
    assert config.admin.listen is None  # no [admin] table: API off
    assert config.health == HealthConfig()
    assert config.primary == BackendConfig("127.0.0.1:1", Address("127.0.0.1", 1), "primary")


def test_config_lookups() -> None:
    config = load_config(EXAMPLE)
    with pytest.raises(KeyError):
        config.backend("nope")


# --------------------------------------------------------------------------- scalars


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (2, 2.0),
        (1.5, 1.5),
        (0, 0.0),
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        (" 250 ms ", 0.25),
        ("0.1s", 0.1),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value, where="x") == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "x: expected a duration"),
        (-1, "x: must not be negative, got -1"),
        ("-1s", "x: must not be negative, got '-1s'"),
        ("2", "x: expected a duration like '2s', '500ms' or a number of seconds, got '2'"),
        ("2 sec", "x: expected a duration"),
        ("fast", "x: expected a duration"),
        (float("nan"), "x: expected a finite duration"),
        (float("inf"), "x: expected a finite duration"),
        (1e10, "x: must be at most"),
        (None, "x: expected a duration"),
        ([1], "x: expected a duration like '2s', '500ms' or a number of seconds, got an array"),
    ],
)
def test_parse_duration_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, where="x")
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("512B", 512),
        ("64KiB", 64 * 1024),
        ("8MiB", 8 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("10kB", 10_000),
        ("10KB", 10_000),
        ("2MB", 2_000_000),
        ("1GB", 1_000_000_000),
        ("1.5KiB", 1536),
        (" 8 MiB ", 8 * 1024 * 1024),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value, where="x") == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", "x: expected a size like '8MiB', got 'lots'"),
        (True, "x: expected a size like '8MiB', got true"),
        (-1, "x: must not be negative, got -1"),
        ("-1KiB", "x: must not be negative"),
        ("8mib", "x: expected a size"),
        ("8", "x: expected a size"),
        (8.0, "x: expected a size like '8MiB', got 8.0"),
        ("0.3KiB", "x: not a whole number of bytes"),
        (None, "x: expected a size"),
    ],
)
def test_parse_size_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, where="x")
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "address", "shown"),
    [
        ("127.0.0.1:50001", Address("127.0.0.1", 50001), "127.0.0.1:50001"),
        ("[::1]:5000", Address("::1", 5000), "[::1]:5000"),
        ("[0:0::0:1]:5", Address("::1", 5), "[::1]:5"),
        ("localhost:80", Address("localhost", 80), "localhost:80"),
        ("db-1.example.com:5432", Address("db-1.example.com", 5432), "db-1.example.com:5432"),
        ("my_host:65535", Address("my_host", 65535), "my_host:65535"),
    ],
)
def test_parse_address(text: str, address: Address, shown: str) -> None:
    parsed = parse_address(text, where="x")
    assert parsed == address
    assert str(parsed) == shown
    assert parse_address(str(parsed), where="x") == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "x: expected 'HOST:PORT', missing ':PORT' in ''"),
        ("127.0.0.1", "x: expected 'HOST:PORT', missing ':PORT'"),
        (":5000", "x: expected 'HOST:PORT', missing HOST in ':5000'"),
        ("host:", "x: port must be a number, got 'host:'"),
        ("host:http", "x: port must be a number"),
        ("host:+5", "x: port must be a number"),
        ("host:65536", "x: port must be 1..65535, got 'host:65536'"),
        ("host:0", "x: port must be 1..65535, got 'host:0'"),
        ("::1:5000", "x: IPv6 addresses need brackets"),
        ("[::1]5000", "x: expected '[IPV6]:PORT'"),
        ("[nope]:5", "x: 'nope' is not an IPv6 address"),
        ("[fe80::1%eth0]:5", "x: IPv6 zone ids are not supported"),
        ("999.1.1.1:5", "x: '999.1.1.1' is not an IPv4 address"),
        ("ho st:5", "x: 'ho st' is not a host name or IP address"),
    ],
)
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text, where="x")
    assert str(info.value).startswith(message)


def test_parse_address_port_zero_only_when_allowed() -> None:
    assert parse_address("0.0.0.0:0", where="x", allow_zero=True) == Address("0.0.0.0", 0)
    with pytest.raises(ConfigError, match=r"port must be 1\.\.65535"):
        parse_address("0.0.0.0:0", where="x")


# --------------------------------------------------------------------------- validation

BACKEND_B = {"name": "b", "address": "127.0.0.1:2", "role": "replica"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, 'config: backend: no backend has role = "primary"'),
        ({"backend": [BACKEND_B]}, 'config: backend: no backend has role = "primary"'),
        (
            {"backend": [PRIMARY, {**BACKEND_B, "role": "primary"}]},
            "config: backend 'b': a second primary (the first is 'a')",
        ),
        (
            {"backend": [PRIMARY, {**BACKEND_B, "name": "a"}]},
            "config: backend[2].name: duplicate name 'a' (also backend[1])",
        ),
        (
            {"backend": [PRIMARY, {**BACKEND_B, "address": "127.0.0.1:1"}]},
            "config: backend 'b'.address: 127.0.0.1:1 is already used by backend 'a'",
        ),
        (
            {"backend": [PRIMARY, {**BACKEND_B, "address": "[::1]:1"}, {"address": "[0::1]:1"}]},
            "config: backend[3].address: [::1]:1 is already used by backend 'b'",
        ),
        (
            {"proxy": {"listen": "127.0.0.1:1"}, "backend": [PRIMARY]},
            "config: backend 'a'.address: 127.0.0.1:1 is the proxy's own listen address",
        ),
        (
            {"proxy": {"listen": "0.0.0.0:2"}, "backend": [PRIMARY, BACKEND_B]},
            "config: backend 'b'.address: 127.0.0.1:2 is the proxy's own listen address",
        ),
        ({"backend": [{**PRIMARY, "name": ""}]}, "config: backend[1].name: expected a non-empty"),
        (
            {"backend": [{**PRIMARY, "name": "a b"}]},
            "config: backend[1].name: expected a non-empty",
        ),
        (
            {"backend": [{**PRIMARY, "name": 5}]},
            "config: backend[1].name: expected a string, got 5",
        ),
        (
            {"backend": [{**PRIMARY, "role": "leader"}]},
            "config: backend 'a'.role: expected 'primary', 'replica' or 'shadow', got 'leader'",
        ),
        (
            {"backend": [PRIMARY, {**BACKEND_B, "sample": 0.5}]},
            "config: backend 'b'.sample: only shadows are sampled",
        ),
        (
            {"backend": [PRIMARY, {**BACKEND_B, "role": "shadow", "sample": 1.5}]},
            "config: backend 'b'.sample: must be from 0.0 to 1.0, got 1.5",
        ),
        (
            {"backend": [PRIMARY, {**BACKEND_B, "role": "shadow", "sample": "half"}]},
            "config: backend 'b'.sample: expected a number from 0.0 to 1.0, got 'half'",
        ),
        (
            {"backend": [{**PRIMARY, "address": "127.0.0.1:0"}]},
            "config: backend 'a'.address: port must be 1..65535, got '127.0.0.1:0'",
        ),
        (
            {"backend": [{**PRIMARY, "address": 5000}]},
            "config: backend 'a'.address: expected a string like 'HOST:PORT', got 5000",
        ),
        ({"backend": [{"name": "a", "role": "primary"}]}, "config: backend 'a'.address: required"),
        ({"backend": [{"role": "primary"}]}, "config: backend[1].address: required"),
        ({"backend": [PRIMARY, 5]}, "config: backend[2]: expected a table, got 5"),
        ({"backend": PRIMARY}, "config: backend: expected an array of tables ([[backend]])"),
        ({"proxy": 5}, "config: proxy: expected a table ([proxy]), got 5"),
        (
            with_primary(proxy={"mode": "fast"}),
            "config: proxy.mode: expected 'async' or 'sync', got 'fast'",
        ),
        (
            with_primary(proxy={"replica_buffer": "lots"}),
            "config: proxy.replica_buffer: expected a size like '8MiB', got 'lots'",
        ),
        (
            with_primary(proxy={"replica_buffer": 512}),
            "config: proxy.replica_buffer: must be at least 1KiB, got 512",
        ),
        (
            with_primary(proxy={"replica_memory": "lots"}),
            "config: proxy.replica_memory: expected a size like '8MiB', got 'lots'",
        ),
        (
            with_primary(proxy={"replica_memory": "64 MIB"}),
            "config: proxy.replica_memory: expected a size like '8MiB', got '64 MIB'",
        ),
        (
            with_primary(proxy={"replica_memory": 512}),
            "config: proxy.replica_memory: must be at least 1KiB, got 512",
        ),
        (
            with_primary(proxy={"replica_memory": "-1MiB"}),
            "config: proxy.replica_memory: must not be negative, got '-1MiB'",
        ),
        (
            with_primary(proxy={"replica_memory": "1.5B"}),
            "config: proxy.replica_memory: not a whole number of bytes, got '1.5B'",
        ),
        (
            with_primary(proxy={"replica_memory": True}),
            "config: proxy.replica_memory: expected a size like '8MiB', got true",
        ),
        (
            with_primary(proxy={"replica_memory": 64.0}),
            "config: proxy.replica_memory: expected a size like '8MiB', got 64.0",
        ),
        (
            with_primary(proxy={"replica_memroy": "64MiB"}),
            "config: proxy.replica_memroy: unknown key (did you mean 'replica_memory'?)",
        ),
        (
            with_primary(proxy={"max_connections": "many"}),
            "config: proxy.max_connections: expected an integer, got 'many'",
        ),
        (
            with_primary(proxy={"max_connections": True}),
            "config: proxy.max_connections: expected an integer, got true",
        ),
        (
            with_primary(proxy={"max_connections": 2.5}),
            "config: proxy.max_connections: expected an integer, got 2.5",
        ),
        (
            with_primary(proxy={"max_connections": 0}),
            "config: proxy.max_connections: must be at least 1, got 0",
        ),
        (
            with_primary(proxy={"min_in_sync": -1}),
            "config: proxy.min_in_sync: must be at least 0, got -1",
        ),
        (
            with_primary(proxy={"min_in_sync": 1}),
            "config: proxy.min_in_sync: 1 is more than the number of replicas (0)",
        ),
        (
            with_primary(proxy={"connect_timeout": 0}),
            "config: proxy.connect_timeout: must be more than 0, got 0",
        ),
        (
            with_primary(proxy={"idle_timeout": "-1s"}),
            "config: proxy.idle_timeout: must not be negative",
        ),
        (
            with_primary(proxy={"divergence": "panic"}),
            "config: proxy.divergence: expected 'log' or 'stale', got 'panic'",
        ),
        (
            with_primary(proxy={"state_file": ""}),
            "config: proxy.state_file: expected a file path, got ''",
        ),
        (
            with_primary(proxy={"listen": "0.0.0.0"}),
            "config: proxy.listen: expected 'HOST:PORT'",
        ),
        (with_primary(health={"fall": 0}), "config: health.fall: must be at least 1, got 0"),
        (with_primary(health={"rise": 0}), "config: health.rise: must be at least 1, got 0"),
        (
            with_primary(health={"interval": 0}),
            "config: health.interval: must be more than 0, got 0",
        ),
        (
            with_primary(health={"timeout": "0s"}),
            "config: health.timeout: must be more than 0, got '0s'",
        ),
        (with_primary(health={"send": 5}), "config: health.send: expected a string, got 5"),
        (
            with_primary(admin={"listen": "0.0.0.0:9901"}),
            "config: admin.token: required when admin.listen is not a loopback address "
            "(0.0.0.0:9901)",
        ),
        (
            with_primary(admin={"listen": "[::]:9901", "token": "  "}),
            "config: admin.token: required when admin.listen is not a loopback address",
        ),
        (with_primary(admin={"token": 5}), "config: admin.token: expected a string, got 5"),
    ],
)
def test_validation_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    assert error_of(data).startswith(message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            with_primary(proxy={"replica_bufer": 1}),
            "config: proxy.replica_bufer: unknown key (did you mean 'replica_buffer'?)",
        ),
        (
            with_primary(health={"intervall": 1}),
            "config: health.intervall: unknown key (did you mean 'interval'?)",
        ),
        (
            {"backend": [{**PRIMARY, "adress": "x:1"}]},
            "config: backend 'a'.adress: unknown key (did you mean 'address'?)",
        ),
        (
            {"backend": [{"role": "primary", "nmae": "x"}]},
            "config: backend[1].nmae: unknown key (did you mean 'name'?)",
        ),
        (
            with_primary(admin={"zzz": 1}),
            "config: admin.zzz: unknown key (known keys: listen, token, tls_cert, tls_key)",
        ),
        (
            with_primary(proxy={"a b": 1}),
            'config: proxy."a b": unknown key',
        ),
        (with_primary(backends=[]), "config: backends: unknown key (did you mean 'backend'?)"),
        (with_primary(listen="x"), "config: listen: unknown key (did you mean 'proxy.listen'?)"),
        (with_primary(zzz=1), "config: zzz: unknown key (known tables: proxy, admin, health"),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(data: dict[str, Any], message: str) -> None:
    assert error_of(data).startswith(message)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("16MiB", 16 * 1024**2),
        ("64MiB", 64 * 1024**2),
        (" 2 GiB ", 2 * 1024**3),
        ("100MB", 100 * 1000**2),
        ("1KiB", 1024),  # the least
        (1024, 1024),
        (3 * 1024**3, 3 * 1024**3),
    ],
)
def test_replica_memory_is_a_size_like_replica_buffer(value: object, size: int) -> None:
    assert config_from_dict(with_primary(proxy={"replica_memory": value})).proxy.replica_memory == (
        size
    )
    # Each bounds its own thing: one does not constrain the other.
    config = config_from_dict(
        with_primary(proxy={"replica_memory": value, "replica_buffer": "1GiB"})
    )
    assert config.proxy.replica_buffer == 1024**3


def test_replica_memory_error_in_a_file_names_the_file_and_the_value(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[proxy]\nreplica_memory = "64 megs"\n[[backend]]\naddress = "127.0.0.1:1"\n'
        'role = "primary"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: proxy.replica_memory: expected a size like '8MiB', got '64 megs'"
    )


@pytest.mark.parametrize("listen", ["127.0.0.1:9901", "127.3.2.1:1", "[::1]:9901", "localhost:0"])
def test_admin_on_loopback_needs_no_token(listen: str) -> None:
    assert config_from_dict(with_primary(admin={"listen": listen})).admin.token == ""


def test_valid_corner_cases() -> None:
    config = config_from_dict(
        {
            "proxy": {"listen": "0.0.0.0:0", "replica_buffer": "1KiB", "min_in_sync": 1},
            "admin": {},
            "health": {"send": "PING\r\n", "expect": "PONG é"},
            "backend": [
                PRIMARY,
                {"address": "127.0.0.1:2"},
                {"name": "s", "address": "127.0.0.1:3", "role": "shadow", "sample": 0},
            ],
        }
    )
    assert config.proxy.listen == Address("0.0.0.0", 0)
    assert config.admin == AdminConfig(listen=Address("127.0.0.1", 9901))
    assert config.health.send == b"PING\r\n"
    assert config.health.expect == "PONG é".encode()
    # An unnamed backend is named by its address; the default role is replica.
    assert config.backend("127.0.0.1:2").role == "replica"
    assert config.backend("s").sample == 0.0


# --------------------------------------------------------------------------- files


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read config file")):
        load_config(path)


def test_load_config_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[proxy]\nmode = "async"\nlisten = \n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in message
    assert "\n" not in message


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b"[proxy]\nstate_file = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_load_config_errors_start_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[proxy]\nreplica_buffer = "lots"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (
        str(info.value) == f"{path}: proxy.replica_buffer: expected a size like '8MiB', got 'lots'"
    )


# --------------------------------------------------------------------------- flags


def test_flags_override_the_file() -> None:
    config = build_config(
        EXAMPLE,
        Overrides(
            listen="127.0.0.1:0",
            primary="10.0.0.1:7000",
            replicas=("10.0.0.2:7000", "[::1]:7000"),
            shadows=("10.0.0.3:7000",),
            mode="sync",
            admin="127.0.0.1:0",
            state_file="/var/lib/rp/state.json",
        ),
    )
    assert config.proxy.listen == Address("127.0.0.1", 0)
    assert config.proxy.mode == "sync"
    assert config.proxy.state_file == "/var/lib/rp/state.json"
    assert config.proxy.replica_buffer == 8 * 1024 * 1024  # untouched file value
    assert config.admin.listen == Address("127.0.0.1", 0)
    assert [(b.name, b.role) for b in config.backends] == [
        ("10.0.0.1:7000", "primary"),
        ("mv2", "replica"),
        ("10.0.0.2:7000", "replica"),
        ("[::1]:7000", "replica"),
        ("10.0.0.3:7000", "shadow"),
    ]
    assert config.primary.address == Address("10.0.0.1", 7000)


def test_primary_flag_with_the_files_address_keeps_its_name() -> None:
    config = build_config(EXAMPLE, Overrides(primary="127.0.0.1:50001"))
    assert config.primary.name == "mv1"


def test_flags_only() -> None:
    config = build_config(None, Overrides(primary="127.0.0.1:7000", replicas=("127.0.0.1:7001",)))
    assert config.proxy == ProxyConfig()
    assert config.admin.listen is None
    assert config.backends == (
        BackendConfig("127.0.0.1:7000", Address("127.0.0.1", 7000), "primary"),
        BackendConfig("127.0.0.1:7001", Address("127.0.0.1", 7001), "replica"),
    )


def test_flag_replicas_count_for_min_in_sync(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[proxy]\nmin_in_sync = 1\n", encoding="utf-8")
    overrides = Overrides(primary="127.0.0.1:1", replicas=("127.0.0.1:2",))
    assert build_config(path, overrides).proxy.min_in_sync == 1
    with pytest.raises(ConfigError, match=r"proxy\.min_in_sync: 1 is more than"):
        build_config(path, Overrides(primary="127.0.0.1:1"))


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        (None, Overrides(), "--primary: required (or give --config with a primary backend)"),
        (None, Overrides(replicas=("127.0.0.1:1",)), "--primary: required"),
        (None, Overrides(primary="nope"), "--primary: expected 'HOST:PORT', missing ':PORT'"),
        (None, Overrides(primary="h:0"), "--primary: port must be 1..65535"),
        (EXAMPLE, Overrides(listen="x"), "--listen: expected 'HOST:PORT'"),
        (EXAMPLE, Overrides(mode="fast"), "--mode: expected 'async' or 'sync', got 'fast'"),
        (EXAMPLE, Overrides(state_file=""), "--state-file: expected a file path"),
        (EXAMPLE, Overrides(replicas=("x:0",)), "--replica: port must be 1..65535"),
        (EXAMPLE, Overrides(shadows=("::1:5",)), "--shadow: IPv6 addresses need brackets"),
        (EXAMPLE, Overrides(admin="0.0.0.0:9901"), "--admin: admin.token in the config file is"),
        (
            EXAMPLE,
            Overrides(replicas=("127.0.0.1:50002",)),
            "--replica: 127.0.0.1:50002 is already used by backend 'mv2'",
        ),
        (
            EXAMPLE,
            Overrides(primary="127.0.0.1:50002"),
            "--primary: 127.0.0.1:50002 is already used by backend 'mv2'",
        ),
        (
            None,
            Overrides(primary="h:1", replicas=("h:2", "h:2")),
            "--replica: h:2 is already used by --replica",
        ),
        (
            None,
            Overrides(primary="h:1", shadows=("H:1",)),
            "--shadow: H:1 is already used by --primary",
        ),
        (
            EXAMPLE,  # listens on 0.0.0.0:50000
            Overrides(replicas=("localhost:50000",)),
            "--replica: localhost:50000 is the proxy's own listen address (0.0.0.0:50000)",
        ),
        (
            None,
            Overrides(listen="[::1]:7", primary="[::1]:7"),
            "--primary: [::1]:7 is the proxy's own listen address",
        ),
    ],
)
def test_flag_errors_name_the_flag(path: Path | None, overrides: Overrides, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(path, overrides)
    assert str(info.value).startswith(message)


def test_file_without_primary_suggests_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[proxy]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        build_config(path, Overrides())
    assert (
        str(info.value) == f'{path}: backend: no backend has role = "primary" (or give --primary)'
    )


# --------------------------------------------------------------------------- properties

INTERESTING = st.sampled_from(
    [
        "",
        "2s",
        "500ms",
        "-1s",
        "8MiB",
        "1KiB",
        "127.0.0.1:5000",
        "0.0.0.0:9901",
        "[::1]:0",
        "primary",
        "replica",
        "shadow",
        "async",
        "sync",
        "log",
        "stale",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.just(datetime(2024, 1, 1))
    | INTERESTING
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=4,
)
KNOWN = {
    "proxy": [f.name for f in dataclasses.fields(ProxyConfig)],
    "admin": [f.name for f in dataclasses.fields(AdminConfig)],
    "health": [f.name for f in dataclasses.fields(HealthConfig)],
    "backend": [f.name for f in dataclasses.fields(BackendConfig)],
}


def table_of(keys: list[str]) -> st.SearchStrategy[dict[str, object]]:
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), VALUES, max_size=5)


TOML_ISH = st.fixed_dictionaries(
    {},
    optional={
        "proxy": table_of(KNOWN["proxy"]) | VALUES,
        "admin": table_of(KNOWN["admin"]) | VALUES,
        "health": table_of(KNOWN["health"]) | VALUES,
        "backend": st.lists(table_of(KNOWN["backend"]) | VALUES, max_size=4) | VALUES,
        "zz": VALUES,
    },
)


@settings(max_examples=200, deadline=None)
@given(TOML_ISH)
def test_any_data_gives_a_config_or_a_config_error(data: dict[str, object]) -> None:
    try:
        config = config_from_dict(data)
    except ConfigError as error:
        assert "\n" not in str(error)
    else:
        assert isinstance(config, Config)


@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        Overrides,
        listen=st.none() | st.text(max_size=10) | INTERESTING,
        primary=st.none() | st.text(max_size=10) | INTERESTING,
        replicas=st.lists(st.text(max_size=10) | INTERESTING, max_size=2).map(tuple),
        shadows=st.lists(st.text(max_size=10) | INTERESTING, max_size=2).map(tuple),
        mode=st.none() | INTERESTING,
        admin=st.none() | INTERESTING,
        state_file=st.none() | st.text(max_size=5),
    )
)
def test_any_flags_give_a_config_or_a_config_error(overrides: Overrides) -> None:
    try:
        build_config(None, overrides)
    except ConfigError as error:
        assert "\n" not in str(error)


def toml_string(text: str) -> str:
    """A TOML basic string (escapes for quotes, backslashes and control characters)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def render(config: Config) -> str:
    """The config as TOML text, every value written out."""
    p, h = config.proxy, config.health
    lines = [
        "[proxy]",
        f"listen = {toml_string(str(p.listen))}",
        f"mode = {toml_string(p.mode)}",
        f"state_file = {toml_string(p.state_file)}",
        f"connect_timeout = {p.connect_timeout!r}",
        f"idle_timeout = {p.idle_timeout!r}",
        f"shutdown_grace = {p.shutdown_grace!r}",
        f"close_grace = {p.close_grace!r}",
        f"replica_buffer = {p.replica_buffer}",
        f"replica_memory = {p.replica_memory}",
        f"replica_timeout = {p.replica_timeout!r}",
        f"max_connections = {p.max_connections}",
        f"min_in_sync = {p.min_in_sync}",
        f"divergence = {toml_string(p.divergence)}",
        "[health]",
        f"interval = {h.interval!r}",
        f"timeout = {h.timeout!r}",
        f"fall = {h.fall}",
        f"rise = {h.rise}",
        f"send = {toml_string(h.send.decode())}",
        f"expect = {toml_string(h.expect.decode())}",
    ]
    if config.admin.listen is not None:
        lines += [
            "[admin]",
            f"listen = {toml_string(str(config.admin.listen))}",
            f"token = {toml_string(config.admin.token)}",
        ]
    for backend in config.backends:
        lines += [
            "[[backend]]",
            f"name = {toml_string(backend.name)}",
            f"address = {toml_string(str(backend.address))}",
            f"role = {toml_string(backend.role)}",
        ]
        if backend.role == "shadow":
            lines.append(f"sample = {backend.sample!r}")
    return "\n".join(lines) + "\n"


HOSTS = (
    st.ip_addresses(v=4).map(str)
    | st.ip_addresses(v=6).map(lambda ip: ipaddress.IPv6Address(ip).compressed)
    | st.lists(st.text("abcxyz019_-", min_size=1, max_size=6), min_size=1, max_size=3)
    .map(".".join)
    .filter(lambda host: not re.fullmatch(r"[0-9.]+", host))
)
POSITIVE = st.floats(min_value=1e-3, max_value=1e6)
NON_NEGATIVE = st.floats(min_value=0.0, max_value=1e6)
UTF8 = st.text(max_size=8).map(str.encode)


ADDRESSES = st.builds(Address, host=HOSTS, port=st.integers(1, 65535))
LISTENS = st.builds(Address, host=HOSTS, port=st.integers(0, 65535))
BACKEND_LISTS = st.lists(
    st.builds(
        BackendConfig,
        name=st.text("aZ09_.:[]-", min_size=1, max_size=10),
        address=ADDRESSES,
        role=st.sampled_from(["replica", "shadow"]),
        sample=st.floats(0.0, 1.0),
    ),
    min_size=1,
    max_size=5,
    unique_by=(lambda b: (b.address.host.lower(), b.address.port), lambda b: b.name),
)
PROXIES = st.builds(
    ProxyConfig,
    listen=LISTENS,
    mode=st.sampled_from(["async", "sync"]),
    state_file=st.text(min_size=1, max_size=10).filter(lambda s: "\0" not in s),
    connect_timeout=POSITIVE,
    idle_timeout=POSITIVE,
    shutdown_grace=NON_NEGATIVE,
    close_grace=NON_NEGATIVE,
    replica_buffer=st.integers(1024, 2**40),
    replica_memory=st.integers(1024, 2**40),
    replica_timeout=POSITIVE,
    max_connections=st.integers(1, 10**6),
    min_in_sync=st.integers(0, 5),  # capped at the number of replicas below
    divergence=st.sampled_from(["log", "stale"]),
)
ADMINS = st.just(AdminConfig()) | st.builds(
    AdminConfig,
    listen=LISTENS,
    token=st.text(max_size=8).map(lambda t: t + "t"),  # never empty: may be off loopback
)
HEALTHS = st.builds(
    HealthConfig,
    interval=POSITIVE,
    timeout=POSITIVE,
    fall=st.integers(1, 100),
    rise=st.integers(1, 100),
    send=UTF8,
    expect=UTF8,
)


@st.composite
def valid_configs(draw: st.DrawFn) -> Config:
    """Valid configs: one primary, unique names and addresses, consistent min_in_sync."""
    drawn = draw(BACKEND_LISTS)
    primary_at = draw(st.integers(0, len(drawn) - 1))
    backends = tuple(
        dataclasses.replace(b, role="primary", sample=1.0)
        if i == primary_at
        else b
        if b.role == "shadow"
        else dataclasses.replace(b, sample=1.0)
        for i, b in enumerate(drawn)
    )
    replicas = sum(1 for b in backends if b.role == "replica")
    proxy = draw(PROXIES)
    proxy = dataclasses.replace(proxy, min_in_sync=min(proxy.min_in_sync, replicas))
    return Config(proxy=proxy, admin=draw(ADMINS), health=draw(HEALTHS), backends=backends)


@settings(max_examples=200, deadline=None)
@given(valid_configs())
def test_valid_configs_round_trip_through_toml(config: Config) -> None:
    assert config_from_dict(tomllib.loads(render(config))) == config


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    config = load_config(EXAMPLE)
    path.write_text(render(config), encoding="utf-8")
    assert load_config(path) == config


def test_allow_list_parses_cidrs_and_names_a_bad_one() -> None:
    import ipaddress

    base = {"backend": [{"name": "p", "address": "127.0.0.1:1", "role": "primary"}]}
    config = config_from_dict({**base, "proxy": {"allow": ["10.0.0.0/8", "::1/128", "127.0.0.1"]}})
    assert config.proxy.allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("127.0.0.1/32"),
    )
    for bad, message in [
        ("10.0.0.0/8", "expected a list of CIDRs"),
        (["10.0.0.1/8"], "proxy.allow[0]: not a CIDR: '10.0.0.1/8'"),
        (["nope"], "proxy.allow[0]: not a CIDR"),
        ([8], "proxy.allow[0]: expected a CIDR string"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_dict({**base, "proxy": {"allow": bad}})


@pytest.mark.parametrize(
    ("listen", "backend"),
    [
        ("127.0.0.1:0", "127.0.0.1:5"),  # a free port: never a backend's
        ("127.0.0.1:5", "127.0.0.2:5"),  # another address, same port
        ("0.0.0.0:5", "192.0.2.1:5"),  # another machine
        ("127.0.0.1:5", "127.0.0.1:6"),
    ],
)
def test_a_backend_near_the_listen_address_is_fine(listen: str, backend: str) -> None:
    config = build_config(None, Overrides(listen=listen, primary=backend))
    assert str(config.backends[0].address) == backend


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from support import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


def test_tls_keys_are_read_into_the_config(certs: Any) -> None:
    cert, key, ca = str(certs.server.cert), str(certs.server.key), str(certs.ca)
    config = config_from_dict(
        {
            "proxy": {"tls_cert": cert, "tls_key": key, "tls_client_ca": ca,
                      "tls_min_version": "TLSv1.3"},
            "admin": {"tls_cert": cert, "tls_key": key},
            "backend": [{**PRIMARY, "tls": True, "tls_ca": ca, "tls_cert": str(certs.client.cert),
                         "tls_key": str(certs.client.key)},
                        {"address": "db.example.com:6380", "tls": True,
                         "tls_server_name": "10.0.0.5"}],
        }
    )  # fmt: skip
    assert (config.proxy.tls_cert, config.proxy.tls_min_version) == (cert, "TLSv1.3")
    assert config.admin.tls_key == key
    assert config.backends[0].tls and config.backends[0].server_name == "127.0.0.1"
    assert config.backends[1].server_name == "10.0.0.5"
    assert config.backends[1].tls_ca == ""  # the system's CAs


def test_tls_mistakes_name_the_key(certs: Any) -> None:
    cert, key, ca = str(certs.server.cert), str(certs.server.key), str(certs.ca)
    cases: list[tuple[dict[str, Any], str]] = [
        (with_primary(proxy={"tls_key": key}), "config: proxy.tls_key: needs proxy.tls_cert"),
        (
            with_primary(proxy={"tls_client_ca": ca}),
            "config: proxy.tls_client_ca: needs proxy.tls_cert",
        ),
        (
            with_primary(proxy={"tls_cert": cert}),
            f"config: proxy.tls_cert: no private key in {cert!r}",
        ),
        (
            with_primary(proxy={"tls_cert": cert, "tls_key": str(certs.other.key)}),
            "config: proxy.tls_key: ",
        ),
        (with_primary(admin={"tls_key": key}), "config: admin.tls_key: needs admin.tls_cert"),
        (
            {"backend": [{**PRIMARY, "tls_ca": ca}]},
            "config: backend 'a'.tls_ca: only used with tls = true",
        ),
        (
            {"backend": [{**PRIMARY, "tls": True, "tls_key": key}]},
            "config: backend 'a'.tls_key: needs tls_cert too",
        ),
        (
            {"backend": [{**PRIMARY, "tls": True, "tls_server_name": "a b"}]},
            "config: backend 'a'.tls_server_name: expected a host name or IP address",
        ),
        (
            {"backend": [{**PRIMARY, "tls": True, "tls_ca": key}]},
            f"config: backend 'a'.tls_ca: no PEM certificate in {key!r}",
        ),
        (
            {"backend": [{**PRIMARY, "tls": True, "tls_ca": "/nonexistent/ca.pem"}]},
            "config: backend 'a'.tls_ca: cannot read '/nonexistent/ca.pem'",
        ),
    ]
    for data, message in cases:
        assert error_of(data).startswith(message), (data, error_of(data))


def test_tls_flags_replace_the_file_and_are_named_in_errors(certs: Any, tmp_path: Path) -> None:
    cert, key = str(certs.server.cert), str(certs.server.key)
    path = tmp_path / "c.toml"
    path.write_text(
        f'[proxy]\ntls_cert = "{certs.other.cert}"\ntls_key = "{certs.other.key}"\n'
        '[[backend]]\naddress = "127.0.0.1:1"\nrole = "primary"\n'
    )
    config = build_config(path, Overrides(tls_cert=cert, tls_key=key))
    assert (config.proxy.tls_cert, config.proxy.tls_key) == (cert, key)
    # The file's key with the flag's certificate: the file's key is named.
    with pytest.raises(ConfigError, match=r"c\.toml: proxy\.tls_key: '.*other\.key' is not the"):
        build_config(path, Overrides(tls_cert=cert))
    with pytest.raises(ConfigError, match=r"^--tls-key: '.*other\.key' is not the key of"):
        build_config(path, Overrides(tls_key=str(certs.other.key), tls_cert=cert))
    with pytest.raises(ConfigError, match=r"^--tls-cert: cannot read '/nope'"):
        build_config(None, Overrides(primary="127.0.0.1:1", tls_cert="/nope"))
    with pytest.raises(ConfigError, match=r"^--tls-key: needs proxy\.tls_cert \(or --tls-cert\)"):
        build_config(None, Overrides(primary="127.0.0.1:1", tls_key=key))
