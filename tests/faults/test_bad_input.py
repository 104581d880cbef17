"""Faults: bad input everywhere: configs, flags, admin requests, and peers that misbehave."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import math
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from support import (
    HOST,
    WAIT,
    assert_no_crash,
    config_text,
    connect,
    digest,
    free_port,
    metric,
    recv_all,
    redis,
    redis_cli,
    replicaproxy,
    run_proxy,
    running,
)

ROGUE = Path(__file__).parent / "rogue.py"
#: Each example is a subprocess (about 0.4 s): few examples, no per-example deadline.
#: No shrinking: each try of a program that wrongly keeps running costs a whole WAIT, so
#: shrinking one failure can take many minutes; the failing example is shown as drawn.
SUBPROCESS_EXAMPLES = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)

# ------------------------------------------------------------------ random configs

KNOWN_KEYS = {
    "proxy": [
        "listen", "mode", "state_file", "connect_timeout", "idle_timeout", "shutdown_grace",
        "close_grace", "replica_buffer", "replica_memory", "replica_timeout", "max_connections",
        "min_in_sync", "divergence", "replica_flush", "allow",
    ],
    "admin": ["listen", "token"],
    "health": ["interval", "timeout", "fall", "rise", "send", "expect"],
    "backend": ["name", "address", "role", "sample"],
}  # fmt: skip
#: Values that are right for some key somewhere, so that some configs get past the first key.
PLAUSIBLE = [
    "127.0.0.1:0", "127.0.0.1:5001", "0.0.0.0:50000", "[::1]:6000", "async", "sync", "primary",
    "replica", "shadow", "8MiB", "1KiB", "500ms", "2s", "1m", "10.0.0.0/8", "stale", "log",
    "", "-1", "mv1",
]  # fmt: skip
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-3, 70000),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.sampled_from(PLAUSIBLE),
    st.datetimes(),
    st.dates(),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(TEXT, SCALARS, max_size=2),
)


def _keys(table: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(KNOWN_KEYS.get(table, ["listen"])),
        st.sampled_from(["replica_bufer", "primary", "port", "timeout_ms"]),
        TEXT.filter(bool),
    )


def _table(name: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_keys(name), VALUES, max_size=4)


CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        "proxy": _table("proxy"),
        "admin": _table("admin"),
        "health": _table("health"),
        "backend": st.lists(_table("backend"), max_size=3),
        "prxy": _table("proxy"),
        "stray": SCALARS,
    },
)


def toml_value(value: object) -> str:
    """``value`` written as TOML (a string, number, date, array or inline table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are TOML's too
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(
            f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in value.items()
        )
        return "{" + inner + "}"
    raise TypeError(value)


def toml_document(config: dict[str, Any]) -> str:
    lines = []
    if "stray" in config:
        lines.append(f"stray = {toml_value(config['stray'])}")
    for name, table in config.items():
        if name == "stray":
            continue
        for entry in table if name == "backend" else [table]:
            lines.append(f"[[{name}]]" if name == "backend" else f"[{name}]")
            lines += [
                f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in entry.items()
            ]
    return "\n".join(lines) + "\n"


@SUBPROCESS_EXAMPLES
@given(CONFIGS)
def test_check_answers_any_config_with_ok_or_one_line(config: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.toml"
        path.write_text(toml_document(config), encoding="utf-8")
        out = subprocess.run(
            replicaproxy("check", str(path)), capture_output=True, timeout=WAIT, cwd=tmp
        )
    assert b"Traceback" not in out.stderr + out.stdout, out.stderr
    assert out.returncode in (0, 2), out
    if out.returncode == 0:
        assert out.stderr == b"" and out.stdout.startswith(f"{path}: ok: ".encode()), out
        return
    lines = output_lines(out.stderr)
    assert len(lines) == 1, out.stderr
    # "replicaproxy: error: FILE: WHERE: WHAT", WHERE a key ("proxy.mode", "backend[2].role",
    # "backend 'x'.address", "x") or "invalid TOML".
    prefix = f"replicaproxy: error: {path}: "
    assert lines[0].startswith(prefix), lines[0]
    where, sep, what = lines[0][len(prefix) :].partition(": ")
    assert sep and where and what.strip(), lines[0]


def output_lines(raw: bytes) -> list[str]:
    """The lines of a program's output: split on newlines only, as a terminal shows them.

    (Not ``text=True``, which also ends lines at ``\\r``; not ``splitlines()``, which also
    ends them at ``\\x1e`` and friends.)
    """
    return [line.decode(errors="replace") for line in raw.rstrip(b"\n").split(b"\n")]


# ------------------------------------------------------------------ random bad flags

RUN_OPTIONS = {
    "--config",
    "--listen",
    "--primary",
    "--replica",
    "--shadow",
    "--mode",
    "--admin",
    "--state-file",
    "--tls-cert",
    "--tls-key",
    "--reset-state",
    "--log-level",
    "--log-format",
    "--help",
}
#: Words for values and stray arguments: anything but NUL (no argv can hold it).
WORD = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1,
    max_size=12,
).filter(lambda w: not w.startswith("-"))
GOOD_FLAGS = st.sampled_from(
    [
        ["--listen", "127.0.0.1:0"],
        ["--primary", "127.0.0.1:1"],
        ["--replica", "127.0.0.1:2"],
        ["--shadow", "127.0.0.1:3"],
        ["--mode", "sync"],
        ["--log-level", "warning"],
        ["--log-format", "json"],
        ["--reset-state"],
    ]
)
BAD_ADDRESS = st.one_of(
    WORD.filter(lambda w: ":" not in w),
    st.integers(65536, 10**12).map(lambda p: f"127.0.0.1:{p}"),
    st.text("abcxyz!%", min_size=1, max_size=4).map(lambda p: f"127.0.0.1:{p}"),
)
BAD_FLAGS = st.one_of(
    st.from_regex(r"--[a-z][a-z-]{0,10}", fullmatch=True)
    .filter(lambda f: f not in RUN_OPTIONS)
    .map(lambda f: [f]),
    st.tuples(
        st.sampled_from(["--listen", "--primary", "--replica", "--shadow", "--admin"]), BAD_ADDRESS
    ).map(list),
    WORD.filter(lambda w: w not in ("async", "sync")).map(lambda w: ["--mode", w]),
    WORD.filter(lambda w: w.lower() not in ("debug", "info", "warning", "error")).map(
        lambda w: ["--log-level", w]
    ),
    WORD.filter(lambda w: w not in ("text", "json")).map(lambda w: ["--log-format", w]),
    WORD.map(lambda w: ["--config", f"/nonexistent/{w}.toml"]),
    st.tuples(st.sampled_from(["--tls-cert", "--tls-key"]), WORD).map(
        lambda t: [t[0], f"/nonexistent/{t[1]}.pem"]
    ),
    WORD.map(lambda w: [w]),  # a stray argument
)


@st.composite
def bad_flag_lists(draw: st.DrawFn) -> list[str]:
    """Good and bad flags in any order, at least one bad; maybe a value missing at the end."""
    parts = draw(st.lists(GOOD_FLAGS, max_size=4)) + draw(
        st.lists(BAD_FLAGS, min_size=1, max_size=2)
    )
    flags = [token for part in draw(st.permutations(parts)) for token in part]
    if draw(st.booleans()):
        flags.append(draw(st.sampled_from(["--listen", "--primary", "--mode", "--config"])))
    return flags


@SUBPROCESS_EXAMPLES
@given(bad_flag_lists())
# A bad value followed by a good one for the same flag: not silently overridden.
@example(["--mode", "0", "--primary", "127.0.0.1:1", "--mode", "sync"])
@example(["--listen", "127.0.0.1:0", "--log-format", "0", "--log-format", "json"])
def test_run_with_bad_flags_exits_2_with_one_line_and_never_listens(flags: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = ["--state-file", str(Path(tmp) / "state.json")]
        try:
            out = subprocess.run(
                replicaproxy("run", *state, *flags), capture_output=True, timeout=WAIT, cwd=tmp
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"replicaproxy run {flags} kept running") from exc
    assert b"Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, out
    lines = output_lines(out.stderr)
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("replicaproxy: error: "), lines[0]
    # It names what is wrong: one of the flags or words given (or the missing --primary),
    # control characters shown escaped.
    shown = ["".join(c if c.isprintable() else repr(c)[1:-1] for c in t) for t in flags]
    assert any(token in lines[0] for token in [*flags, *shown, "--primary"]), lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["check", "/nonexistent/a\nb.toml"],
        ["run", "--config", "/nonexistent/a\nb.toml"],
        ["run", "--primary", "127.0.0.1:1", "stray\nword"],
    ],
)
def test_user_text_with_a_newline_stays_on_one_line(args: list[str], tmp_path: Path) -> None:
    out = subprocess.run(replicaproxy(*args), capture_output=True, timeout=WAIT, cwd=tmp_path)
    assert out.returncode == 2, out
    assert len(output_lines(out.stderr)) == 1, out.stderr


def test_unusable_state_file_flag_is_one_line(tmp_path: Path) -> None:
    state = str(tmp_path / "missing-folder" / "state.json")
    out = subprocess.run(
        replicaproxy(
            "run",
            "--listen",
            f"{HOST}:0",
            "--primary",
            f"{HOST}:{free_port()}",
            "--state-file",
            state,
        ),
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [
        f"replicaproxy: error: {state}: cannot write: No such file or directory"
    ]


# ------------------------------------------------------------------ the admin API

TOKEN = "s3cret"


def admin_request(
    admin: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to the admin API on a fresh connection: (status, headers, body)."""
    host, port = admin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        if chunked:
            conn.putrequest(method, path)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            assert body is not None
            for lo in range(0, len(body), 8192):
                piece = body[lo : lo + 8192]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except (ConnectionResetError, BrokenPipeError):
        return 0, {}, b""  # the server may close on an oversized body before reading it
    finally:
        conn.close()


def test_admin_api_answers_abuse_with_4xx_json_and_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with redis(tmp_path / "a", "r1") as (_, p1), redis(tmp_path / "b", "r2") as (_, p2):
        config = config_text(tmp_path, [("r1", p1, "primary"), ("r2", p2, "replica")])
        text = Path(config).read_text().replace("[admin]\n", f'[admin]\ntoken = "{TOKEN}"\n')
        Path(config).write_text(text)
        with run_proxy(config) as px:
            before = px.status()
            auth = {"Authorization": f"Bearer {TOKEN}"}
            huge = b"{" + b'"x": 1, ' * 10_000 + b"}"  # 80 KB: past the 64 KiB limit
            cases: list[tuple[str, str, dict[str, Any], int]] = [
                ("PUT", "/status", {}, 405),
                ("DELETE", "/backends/r2/promote", {"headers": auth}, 405),
                ("POST", "/status", {"headers": auth, "body": b"{}"}, 405),
                ("GET", "/backends/r2/promote", {}, 405),
                ("PATCH", "/reload", {"headers": auth}, 405),
                ("GET", "/nope", {}, 404),
                ("POST", "/backends/nope/promote", {"headers": auth}, 404),
                ("POST", "/backends/nope/mark-synced", {"headers": auth}, 404),
                ("POST", "/backends/..%2f..%2fetc/promote", {"headers": auth}, 404),
                ("GET", "/events?since=-1", {}, 400),
                ("GET", "/events?since=1&since=2", {}, 400),
                # Bad bodies: POST bodies carry nothing; these fail for what they ask.
                ("POST", "/backends/r1/promote", {"headers": auth, "body": b"{not json"}, 409),
                (
                    "POST",
                    "/backends/r2/mark-synced",
                    {
                        "headers": {**auth, "Content-Type": "application/json"},
                        "body": b"\xff\xfe\x00garbage",
                    },
                    409,
                ),
                # Too big: refused before anything is done.
                ("POST", "/backends/r2/promote", {"headers": auth, "body": huge}, 413),
                (
                    "POST",
                    "/backends/r2/promote",
                    {"headers": auth, "body": huge, "chunked": True},
                    413,
                ),
                ("POST", "/drain", {"headers": auth, "body": huge}, 413),
                # No token, a wrong one, the wrong scheme.
                ("POST", "/backends/r2/promote", {}, 401),
                (
                    "POST",
                    "/backends/r2/promote",
                    {"headers": {"Authorization": "Bearer nope"}},
                    403,
                ),
                (
                    "POST",
                    "/backends/r2/promote",
                    {"headers": {"Authorization": f"Basic {TOKEN}"}},
                    401,
                ),
                ("POST", "/drain", {"headers": {"Authorization": "Bearer "}}, 401),
                # A browser page of another site, even with the token.
                (
                    "POST",
                    "/backends/r2/promote",
                    {"headers": {**auth, "Origin": "http://evil.example"}},
                    403,
                ),
                ("POST", "/drain", {"headers": {**auth, "Origin": "null"}}, 403),
                (
                    "POST",
                    "/backends/r2/promote",
                    {"headers": {**auth, "Sec-Fetch-Site": "cross-site"}},
                    403,
                ),
                ("POST", "/reload", {"headers": {**auth, "Host": "evil.example"}}, 403),
                ("GET", "/status", {"headers": {"Host": "rebound.example:80"}}, 403),
            ]
            answers = []
            for method, path, kw, expected in cases:
                status, headers, body = admin_request(px.admin, method, path, **kw)
                answers.append((method, path, status))
                if status == 0 and expected == 413:
                    continue  # closed on the oversized body: refused all the same
                assert status == expected, (method, path, kw.get("headers"), status, body[:200])
                assert headers.get("content-type", "").startswith("application/json"), headers
                error = json.loads(body)["error"]
                assert isinstance(error, str) and error, body
            # Not HTTP at all: the connection is answered or closed, and nothing else happens.
            with connect(int(px.admin.rsplit(":", 1)[1])) as s:
                s.sendall(b"\x16\x03\x01\x02\x00GARBAGE\r\n\r\n")
                recv_all(s, timeout=5)
            after = px.status()
            for key in ("epoch", "primary", "draining"):
                assert after[key] == before[key], key
            assert px.states() == {"r1": "in_sync", "r2": "in_sync"}
            assert px.proc.popen.poll() is None
            assert redis_cli(px.port, "PING") == "PONG"
            assert_no_crash(px.proc)
            print(
                f"\nMEASURED admin abuse: {len(cases)} bad requests, all 4xx JSON; "
                f"view unchanged (epoch {after['epoch']}, primary {after['primary']})"
            )


# ------------------------------------------------------------------ peers that misbehave


def _reset(s: socket.socket) -> None:
    """Close ``s`` with a TCP reset instead of a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_clients_that_reset_at_every_stage_harm_no_one(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rounds = 30
    with redis(tmp_path / "a", "r1") as (_, p1), redis(tmp_path / "b", "r2") as (_, p2):
        config = config_text(tmp_path, [("r1", p1, "primary"), ("r2", p2, "replica")])
        with run_proxy(config) as px:
            good: list[str] = []

            # A well-behaved client all along, on sessions of its own.
            def well_behaved() -> None:
                for i in range(rounds):
                    with connect(px.port) as s, s.makefile("rb") as f:
                        s.sendall(f"SET good:{i} {i}\r\nGET good:{i}\r\n".encode())
                        good.append((f.readline() + f.readline() + f.readline()).decode())

            bystander = threading.Thread(target=well_behaved, daemon=True)
            bystander.start()
            for i in range(rounds):
                _reset(connect(px.port))  # right after connect
                s = connect(px.port)
                s.sendall(f"SET half:{i} ".encode())  # mid-request
                _reset(s)
                s = connect(px.port)
                s.sendall(f"SET done:{i} {i}\r\n".encode())
                assert s.recv(5) == b"+OK\r\n"
                _reset(s)  # after the reply
                with contextlib.suppress(OSError):  # reset before the proxy even answered
                    s = connect(px.port)
                    s.sendall(b"PING\r\nPING\r\nPING\r\n")
                    _reset(s)
            bystander.join(60)
            assert good == [f"+OK\r\n${len(str(i))}\r\n{i}\r\n" for i in range(rounds)], good
            px.proc.wait_count(r"outcome=client_reset", rounds)
            # Input sent before a reset still reached both; partial commands reached neither
            # as a command: primary and replica end up with the same data (the replica may
            # take a moment for its last bytes: bounded wait).
            deadline = time.monotonic() + WAIT
            while digest(p1) != digest(p2):
                assert time.monotonic() < deadline, "primary and replica differ"
            assert redis_cli(p1, "DBSIZE") == str(2 * rounds)  # good:i and done:i
            assert px.states() == {"r1": "in_sync", "r2": "in_sync"}
            assert px.status()["epoch"] == 0
            assert_no_crash(px.proc)


def test_clients_that_reset_before_the_upstreams_connect_leak_no_session(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    limit = 10
    with redis(tmp_path / "a", "r1") as (_, p1), redis(tmp_path / "b", "r2") as (_, p2):
        config = config_text(
            tmp_path,
            [("r1", p1, "primary"), ("r2", p2, "replica")],
            extra=f"max_connections = {limit}\nidle_timeout = 0.5",
        )
        with run_proxy(config) as px:
            for i in range(limit):
                s = connect(px.port)
                s.sendall(f"SET half:{i} ".encode())
                _reset(s)
            # Each of them ends (client_reset) within a few linger/idle periods ...
            deadline = time.monotonic() + 10
            while (active := px.status()["sessions_active"]) > 0:
                assert time.monotonic() < deadline, f"{active} of {limit} sessions never ended"
            # ... and a well-behaved client still gets in.
            assert redis_cli(px.port, "PING") == "PONG"


@pytest.mark.parametrize("mode", ["reset", "garbage", "half-close"])
@pytest.mark.parametrize("role", ["replica", "primary"])
def test_backend_that_misbehaves_is_caught_and_the_proxy_serves_on(
    tmp_path: Path, role: str, mode: str
) -> None:
    with (
        redis(tmp_path, "good") as (_, good),
        running([sys.executable, str(ROGUE), mode], name=f"rogue-{mode}") as rogue,
    ):
        bad = int(rogue.wait_for(r"listening on [\d.]+:(\d+)")[1])
        backends = (
            [("good", good, "primary"), ("rogue", bad, "replica")]
            if role == "replica"
            else [("rogue", bad, "primary"), ("good", good, "replica")]
        )
        # The health checks ask what a real check would: a rogue that accepts and then
        # resets or closes every connection is not a healthy server.
        health = (
            'interval = 0.2\ntimeout = 0.5\nfall = 2\nrise = 2\nsend = "PING\\r\\n"\n'
            'expect = "+PONG"'
        )
        with run_proxy(config_text(tmp_path, backends, health=health)) as px:
            replies = []
            for i in range(3):
                with connect(px.port) as s:
                    s.sendall(f"SET k {i}\r\n".encode())
                    s.shutdown(socket.SHUT_WR)
                    replies.append(recv_all(s, timeout=10))
            rogue.wait_for(r"conn \d+ ")
            status = px.status()
            divergences = metric(px.admin, 'replicaproxy_divergences_total{backend="good"}')
            divergences += metric(px.admin, 'replicaproxy_divergences_total{backend="rogue"}')
            if role == "primary" and mode == "garbage":
                # The primary's answer is the answer, garbage or not: the client gets it, and
                # the replica's differing answer is reported; it makes the replica stale
                # (divergence = "stale"), so the later sessions go without it.
                assert all(r.startswith(b"\x00\xff-GARBAGE") for r in replies), replies
                assert divergences == 1
                assert status["primary"] == "rogue"
                assert px.states()["good"] == "stale"
            else:
                # Every client got the good server's answer, whoever was primary at first.
                assert replies == [b"+OK\r\n"] * 3, replies
                assert status["primary"] == "good"
            if role == "replica":
                # A misbehaving replica ends stale (it lost input or output) or reported
                # (a replica that closes once it had all the input and the client's EOF,
                # replies unsent, is no longer compared: Redis closes that way too).
                stale = px.states()["rogue"] == "stale"
                lost = px.proc.count(r"compare_lost rogue: closed at offset")
                assert stale or divergences >= 1 or lost, (px.states(), divergences)
            elif mode != "garbage":
                assert px.states() == {"rogue": "stale", "good": "in_sync"}
                assert status["epoch"] == 1
            # And the proxy goes on serving new sessions.
            with connect(px.port) as s:
                s.sendall(b"GET k\r\n")
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s, timeout=10)
            assert px.proc.popen.poll() is None
            assert_no_crash(px.proc)
