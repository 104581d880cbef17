"""Small logging helpers shared by the server and the CLI."""

from __future__ import annotations

import copy
import errno
import logging
import logging.handlers
import os
import queue
import ssl
import threading
import time
from collections.abc import Callable

from replicaproxy.tls import ssl_message

#: Log records waiting for the writer thread; past this, new ones are dropped.
LOG_QUEUE = 10_000
_TRACEBACK = logging.Formatter()  # (only its formatException is used)


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the log writer's thread and never blocks the event loop.

    Writing to stderr blocks once nobody reads it (a full pipe): done on the
    loop's thread, that would stop every session. Here a full queue drops the
    record instead, and the count is logged as soon as there is room again.
    """

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """A copy with its message made (QueueHandler's job), the traceback kept apart.

        QueueHandler's own ``prepare`` appends the traceback to the message, so the
        JSON format would carry it inside ``message``; kept in ``exc_text``, the text
        format still prints it below the line and the JSON one gives it a field.
        """
        prepared = copy.copy(record)
        prepared.msg = prepared.message = record.getMessage()
        prepared.args = None
        if record.exc_info:
            prepared.exc_text = record.exc_text or _TRACEBACK.formatException(record.exc_info)
        prepared.exc_info = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                self.queue.put_nowait(self._dropped_note())
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _dropped_note(self) -> logging.LogRecord:
        return logging.LogRecord(
            "replicaproxy",
            logging.WARNING,
            __file__,
            0,
            "%d log lines dropped: the log was not read for a while",
            (self.dropped,),
            None,
        )


class LogWriter:
    """The thread that writes queued records to ``handler``.

    (``logging.handlers.QueueListener`` does this too, but its ``stop`` waits
    without a bound, and a stuck stderr would then hang the proxy's exit.)
    """

    def __init__(
        self, records: queue.Queue[logging.LogRecord | None], handler: logging.Handler
    ) -> None:
        self.records = records
        self.handler = handler
        self._thread = threading.Thread(target=self._write, name="log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _write(self) -> None:
        while (record := self.records.get()) is not None:
            try:
                self.handler.handle(record)
            except Exception:  # the writer must outlive a bad record
                self.handler.handleError(record)

    def stop(self, timeout: float = 2.0) -> bool:
        """Write what is queued, waiting at most ``timeout`` seconds.

        False: stderr is stuck (nobody reads it); what is still queued is lost.
        """
        if not self._thread.is_alive():
            return True
        try:
            self.records.put(None, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


def one_line(text: str) -> str:
    """``text`` with every control character (a newline, an escape sequence) escaped.

    For messages that quote what a user typed: a path or word holding a newline
    can then neither split the line nor reach the terminal raw.
    """
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class RateLimited:
    """Let a kind of log line through at most once per ``interval`` seconds.

    Lines held back are counted. With ``schedule`` (the event loop's ``call_later``),
    one line says how many were held back, and repeats the last of them, at the end
    of the interval, whether or not another line of the kind comes; without it, the
    count rides on the next line that gets through.
    """

    def __init__(
        self,
        interval: float = 5.0,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self.interval = interval
        self._schedule = schedule
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        # The last line held back, per kind: (logger, level, msg, args).
        self._latest: dict[str, tuple[logging.Logger, int, str, tuple[object, ...]]] = {}

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            held = self._held.get(key, 0)
            self._held[key] = held + 1
            self._latest[key] = (logger, level, msg, args)
            if not held and self._schedule is not None:
                self._schedule(last + self.interval - now, lambda: self._summarise(key))
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        self._latest.pop(key, None)
        if held:
            logger.log(level, msg + " (%d more like this not logged)", *args, held)
        else:
            logger.log(level, msg, *args)

    def _summarise(self, key: str) -> None:
        """The interval is over: say how many lines of ``key`` were held back."""
        held = self._held.pop(key, 0)
        latest = self._latest.pop(key, None)
        if not held or latest is None:
            return
        logger, level, msg, args = latest
        self._last[key] = time.monotonic()
        logger.log(
            level,
            "%d more like this in the last %.0f s, not logged one by one; the last: " + msg,
            held,
            self.interval,
            *args,
        )

    def flush(self) -> None:
        """Summarise every kind with lines held back (at shutdown)."""
        for key in list(self._held):
            self._summarise(key)


#: Errors that are this machine's shortage, not a backend's failure: they must
#: never make a backend stale or trigger a failover (connects and health checks).
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)


def describe_error(exc: BaseException) -> str:
    """A short, stable description of an I/O error: ``Connection refused``, not a repr.

    asyncio wraps connect errors as ``OSError(errno, "Connect call failed ...")``;
    the errno says what happened, so it wins over the message. A TLS error's errno is
    OpenSSL's, not the system's: its own words say what happened (``certificate verify
    failed: self-signed certificate``).
    """
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {ssl_message(exc)}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
