"""The log path: records queued for a writer thread, dropped (and counted) when it is stuck."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import json
import logging
import os
import re
import select
import sys
import threading
import time
from pathlib import Path

import uvloop
from pythonjsonlogger.json import JsonFormatter

from replicaproxy.logutil import (
    AccessLog,
    DroppingQueueHandler,
    LineFormatter,
    LogQueue,
    LogWriter,
    LoopWriter,
    one_line,
)


def record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, msg, None, None)


def taken(records: LogQueue) -> list[logging.LogRecord]:
    """What waits in ``records``: records (no line made already)."""
    entries = records.take()
    assert all(isinstance(e, logging.LogRecord) for e in entries), entries
    return [e for e in entries if isinstance(e, logging.LogRecord)]


def test_a_full_queue_drops_and_says_how_many_once_there_is_room() -> None:
    records = LogQueue(maxsize=2)
    handler = DroppingQueueHandler(records)
    for i in range(5):
        handler.handle(record(f"line {i}"))  # never blocks
    assert handler.dropped == 3
    assert [r.getMessage() for r in taken(records)] == ["line 0", "line 1"]
    handler.handle(record("line 5"))
    note, after = taken(records)
    assert note.levelno == logging.WARNING
    assert note.getMessage() == "3 log lines dropped: the log was not read for a while"
    assert after.getMessage() == "line 5"
    assert handler.dropped == 0


class Blocked(logging.Handler):
    """A handler whose writes hang until released, like a full pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.written: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.go.wait()
        self.written.append(record.getMessage())


def test_the_writer_writes_in_order_and_stops_within_its_bound_when_stuck() -> None:
    records = LogQueue(maxsize=10)
    out = Blocked()
    writer = LogWriter(records, out)
    writer.start()
    for i in range(3):
        records.put_nowait(record(f"line {i}"))
    assert writer.stop(timeout=0.2) is False, "stuck: it must give up, not hang"
    out.go.set()
    assert writer.stop(timeout=5) is True
    assert out.written == ["line 0", "line 1", "line 2"]


def test_one_line_escapes_control_characters_only() -> None:
    assert one_line("a\nb\r\x1b[31mé中\t") == "a\\nb\\r\\x1b[31mé中\\t"


def logged_exception(formatter: logging.Formatter) -> str:
    """What a writer with ``formatter`` prints for ``log.exception`` through the queue."""
    records = LogQueue()
    out = io.StringIO()
    stream = logging.StreamHandler(out)
    stream.setFormatter(formatter)
    log = logging.Logger("t")
    log.addHandler(DroppingQueueHandler(records))
    try:
        raise ValueError("the cause")
    except ValueError:
        log.exception("session %d: internal error", 7)
    writer = LogWriter(records, stream)
    writer.start()
    assert writer.stop(timeout=5)
    return out.getvalue()


def test_a_traceback_has_a_json_field_of_its_own() -> None:
    line = logged_exception(JsonFormatter("%(levelname)s %(message)s"))
    doc = json.loads(line)
    assert doc["message"] == "session 7: internal error"
    assert "Traceback" in doc["exc_info"] and "ValueError: the cause" in doc["exc_info"]


def test_a_traceback_follows_its_text_line() -> None:
    text = logged_exception(logging.Formatter("%(levelname)s %(message)s"))
    first, *rest = text.splitlines()
    assert first == "ERROR session 7: internal error"
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: the cause"


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_lines_waiting_together_are_written_together_in_order() -> None:
    records = LogQueue()
    stream = CountingStream()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for i in range(500):
        records.put_nowait(record(f"line {i}"))
    writer = LogWriter(records, handler)
    writer.start()
    assert writer.stop(timeout=5)
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(500)]
    assert stream.writes == 1


def test_the_access_log_writes_what_logger_info_would() -> None:
    """Its records carry the message and the session's fields, as ``extra`` would make
    them; the text and JSON lines are those of any other record."""
    records = LogQueue()
    log = logging.Logger("replicaproxy.access")
    log.addHandler(DroppingQueueHandler(records))
    fields = {"session": 7, "client": "127.0.0.1:5", "backends": ["p", "r"], "outcome": "ok"}
    log.info("session 7 outcome=%s", "ok", extra=fields)
    AccessLog(log, tuple(fields)).log("session 7 outcome=ok", fields)
    ours, theirs = taken(records)[::-1]
    for formatter in (LineFormatter(), JsonFormatter("%(levelname)s %(name)s %(message)s")):
        ours.created = theirs.created  # (the same instant, to compare the lines)
        ours.msecs = theirs.msecs
        assert formatter.format(ours) == formatter.format(theirs)
    assert set(vars(ours)) == set(vars(theirs))
    assert vars(ours)["backends"] == ["p", "r"]
    quiet = logging.Logger("quiet", logging.WARNING)
    assert not AccessLog(quiet, ()).enabled()


def test_the_text_lines_are_those_of_a_plain_formatter() -> None:
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours = LineFormatter()
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_001.0):
        r = record("hello %s")
        r.args = ("there",)
        r.created = created
        r.msecs = (created % 1) * 1000
        assert ours.format(r) == plain.format(r)


def test_the_access_log_takes_the_loggers_way_when_it_has_filters_or_other_handlers() -> None:
    """Straight onto the queue only where nothing else would see the record."""
    records = LogQueue()
    log = logging.Logger("replicaproxy.access")
    log.addHandler(DroppingQueueHandler(records))
    access = AccessLog(log, ("outcome",))
    log.addFilter(lambda r: vars(r)["outcome"] != "refused")
    assert not access.log_text("no line: the filter wants the record")
    assert not taken(records)
    access.log("refused one", {"outcome": "refused"})
    access.log("served one", {"outcome": "ok"})
    assert [r.getMessage() for r in taken(records)] == ["served one"]

    class Kept(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.seen.append(record.getMessage())

    kept = Kept()
    log.addHandler(kept)
    access.log("seen twice", {"outcome": "ok"})
    assert [r.getMessage() for r in taken(records)] == ["seen twice"]
    assert kept.seen == ["seen twice"]


def test_the_text_lines_keep_tracebacks_and_stacks_as_a_plain_formatter_does() -> None:
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("the cause")
    except ValueError:
        r = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    r.stack_info = "Stack (most recent call last):\n  the stack"
    assert LineFormatter().format(r) == plain.format(r)


def test_with_text_lines_the_access_log_queues_the_line_the_writer_would_make() -> None:
    records = LogQueue()
    log = logging.Logger("replicaproxy.access")
    queue_handler = DroppingQueueHandler(records)
    queue_handler.lines = formatter = LineFormatter()
    log.addHandler(queue_handler)
    fields = {"session": 7, "outcome": "ok"}
    log.info("session 7 outcome=ok", extra=fields)
    AccessLog(log, tuple(fields)).log("session 7 outcome=ok", fields)
    theirs, ours = records.take()
    assert isinstance(theirs, logging.LogRecord) and isinstance(ours, str)
    assert AccessLog(log, ()).log_text("session 7 outcome=ok")
    (text,) = records.take()
    assert isinstance(text, str) and text[23:] == ours[23:]
    made = formatter.format(theirs)
    assert ours[23:] == made[23:], "the same line but for the time"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", ours[:23]), ours
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    records.put_nowait(ours)
    records.put_nowait(theirs)
    writer = LogWriter(records, handler)
    writer.start()
    assert writer.stop(timeout=5)
    assert stream.getvalue() == f"{ours}\n{made}\n"


# ------------------------------------------------------------------ LoopWriter

F_SETPIPE_SZ = 1031  # (fcntl.F_SETPIPE_SZ, named in Python 3.10+ only on some builds)
PLAIN = logging.Formatter("%(message)s")


def test_the_loop_writes_a_pipe_without_waiting_and_drops_and_counts_past_its_bound() -> None:
    unread, stderr = os.pipe()
    fcntl.fcntl(stderr, F_SETPIPE_SZ, 4096)
    lines = [f"line {i:03d} " + "x" * 100 for i in range(200)]

    async def main() -> tuple[str, str, int, str]:
        writer = LoopWriter.open(stderr, asyncio.get_running_loop(), PLAIN)
        assert writer is not None
        assert os.get_blocking(stderr), "stderr's own descriptor must be left as it is"
        writer.most = 50
        for line in lines:  # far more than the pipe holds: none of these may block
            writer.add(line)
        dropped = writer.dropped
        writer.flush()  # as the next batch would: the pipe takes what it has room for
        first = os.read(unread, 1 << 20).decode()
        writer.add("after")  # room again: the count of those dropped comes first
        return first, writer.close(), dropped, os.read(unread, 1 << 20).decode()

    try:
        first, rest, dropped, second = uvloop.run(main())
    finally:
        os.close(unread)
        os.close(stderr)
    assert dropped == 200 - 1 - 50  # line 0 written at once, 50 waiting, the rest dropped
    written = (first + second + rest).splitlines()
    assert written[:51] == lines[:51]
    assert written[51:] == ["149 log lines dropped: the log was not read for a while", "after"]


def test_the_loop_writes_a_file_as_it_is_and_a_line_after_a_quiet_spell_at_once(
    tmp_path: Path,
) -> None:
    with open(tmp_path / "log", "wb") as f:
        fd = f.fileno()

        async def main() -> tuple[bytes, bytes]:
            writer = LoopWriter.open(fd, asyncio.get_running_loop(), PLAIN)
            assert writer is not None
            writer.add("one")  # after a quiet spell: at once
            now = (tmp_path / "log").read_bytes()
            writer.add("two")  # within the batch: with the next one
            writer.add("three")
            assert (tmp_path / "log").read_bytes() == now
            await asyncio.sleep(writer.batch * 4)
            assert writer.close() == ""
            return now, (tmp_path / "log").read_bytes()

        now, then = uvloop.run(main())
    assert now == b"one\n"
    assert then == b"one\ntwo\nthree\n"


def test_the_loop_stops_writing_once_the_reader_is_gone() -> None:
    unread, stderr = os.pipe()

    async def main() -> LoopWriter:
        writer = LoopWriter.open(stderr, asyncio.get_running_loop(), PLAIN)
        assert writer is not None
        os.close(unread)
        writer.add("nobody reads this")  # EPIPE: no exception, no retry
        writer.add("nor this")
        writer.close()
        return writer

    try:
        writer = uvloop.run(main())
    finally:
        os.close(stderr)
    assert writer.broken and writer.dropped == 1


def test_on_the_loop_every_record_and_access_line_is_written_by_the_loop_in_order() -> None:
    unread, stderr = os.pipe()
    records = LogQueue()
    log = logging.Logger("replicaproxy.access")
    queue_handler = DroppingQueueHandler(records)
    log.addHandler(queue_handler)
    formatter = JsonFormatter("%(levelname)s %(name)s %(message)s")
    access = AccessLog(log, ("session",))

    async def main() -> None:
        writer = LoopWriter.open(stderr, asyncio.get_running_loop(), formatter)
        assert writer is not None
        queue_handler.loop_writer = writer
        log.warning("before")
        access.log("session 1 outcome=ok", {"session": 1})  # (JSON: a record, not text)
        log.error("after")
        assert writer.close() == ""

    try:
        uvloop.run(main())
        written = os.read(unread, 1 << 16).decode()
    finally:
        os.close(unread)
        os.close(stderr)
    assert records.qsize() == 0, "nothing went to the writer thread"
    lines = [json.loads(x) for x in written.splitlines()]
    assert [(x["levelname"], x["message"]) for x in lines] == [
        ("WARNING", "before"),
        ("INFO", "session 1 outcome=ok"),
        ("ERROR", "after"),
    ]
    assert lines[1]["session"] == 1


def test_a_batch_the_stream_refuses_is_counted_and_the_next_is_written() -> None:
    sent: list[bytes] = []

    def full_once(data: bytes) -> int:
        if not sent:
            sent.append(b"")
            raise OSError(errno.ENOSPC, "No space left on device")
        sent.append(data)
        return len(data)

    async def main() -> LoopWriter:
        writer = LoopWriter(full_once, asyncio.get_running_loop(), PLAIN)
        writer.add("lost")  # written at once, and refused
        writer.flush()
        writer.add("kept")
        writer.close()
        return writer

    writer = uvloop.run(main())
    assert not writer.broken and writer.dropped == 0
    assert sent[1:] == [b"1 log lines dropped: the log was not read for a while\nkept\n"]


def test_lines_that_wait_for_room_are_written_once_there_is_some_with_no_line_after_them() -> None:
    unread, stderr = os.pipe()
    fcntl.fcntl(stderr, F_SETPIPE_SZ, 4096)
    lines = [f"line {i:03d} " + "x" * 100 for i in range(100)]  # (about 11 KB)
    got = bytearray()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        writer = LoopWriter.open(stderr, loop, PLAIN)
        assert writer is not None
        for line in lines[:60]:
            writer.add(line)
        writer.flush()  # the pipe fills: the rest waits
        for line in lines[60:]:
            writer.add(line)  # (and these after it)
        # Written by the writer's own ticks alone, as the reader makes room.
        await loop.run_in_executor(None, _read_until, unread, got, len(lines))

    try:
        uvloop.run(main())
    finally:
        os.close(unread)
        os.close(stderr)
    assert got.decode().splitlines() == lines


def _read_until(fd: int, into: bytearray, count: int, timeout: float = 10) -> None:
    """Read ``fd`` until ``count`` lines came, or for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while into.count(b"\n") < count and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            into += os.read(fd, 1 << 16)
