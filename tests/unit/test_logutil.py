"""The log path: records queued for a writer thread, dropped (and counted) when it is stuck."""

from __future__ import annotations

import io
import json
import logging
import queue
import threading

from pythonjsonlogger.json import JsonFormatter

from replicaproxy.logutil import DroppingQueueHandler, LogWriter, one_line


def record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, msg, None, None)


def test_a_full_queue_drops_and_says_how_many_once_there_is_room() -> None:
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(maxsize=2)
    handler = DroppingQueueHandler(records)
    for i in range(5):
        handler.handle(record(f"line {i}"))  # never blocks
    assert handler.dropped == 3
    got = [records.get_nowait(), records.get_nowait()]
    assert [r.getMessage() for r in got if r is not None] == ["line 0", "line 1"]
    handler.handle(record("line 5"))
    note, after = records.get_nowait(), records.get_nowait()
    assert note is not None and after is not None
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
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(maxsize=10)
    out = Blocked()
    writer = LogWriter(records, out)
    writer.start()
    for i in range(3):
        records.put(record(f"line {i}"))
    assert writer.stop(timeout=0.2) is False, "stuck: it must give up, not hang"
    out.go.set()
    assert writer.stop(timeout=5) is True
    assert out.written == ["line 0", "line 1", "line 2"]


def test_one_line_escapes_control_characters_only() -> None:
    assert one_line("a\nb\r\x1b[31mé中\t") == "a\\nb\\r\\x1b[31mé中\\t"


def logged_exception(formatter: logging.Formatter) -> str:
    """What a writer with ``formatter`` prints for ``log.exception`` through the queue."""
    records: queue.Queue[logging.LogRecord | None] = queue.Queue()
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
