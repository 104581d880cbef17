"""Small logging helpers shared by the server and the CLI."""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import queue
import socket
import ssl
import stat
import threading
import time
from collections import deque
from collections.abc import Callable

from replicaproxy.tls import ssl_message

#: Log records waiting for a writer (the thread's queue, or the loop's LoopWriter);
#: past this, new ones are dropped.
LOG_QUEUE = 10_000
#: A writer writes at most once per this many seconds, all the lines waiting in one
#: system call; a line that comes after a quiet spell is written at once. One access
#: line per session, written one by one, cost more CPU than the sessions' own Python
#: code at a thousand sessions a second. 5 ms: at most 200 writes a second, and no
#: person (or test) reading the log waits for a line longer than that.
LOG_BATCH = 0.005
_TRACEBACK = logging.Formatter()  # (only its formatException is used)


#: What waits for the writer: a record, or a line made already (see AccessLog).
Entry = logging.LogRecord | str


def _record(entry: Entry) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": entry}) if isinstance(entry, str) else entry


class LogQueue:
    """Records waiting for the writer thread.

    ``queue.Queue`` takes two locks and wakes the waiting writer for every record;
    here a record is one ``deque.append`` (atomic), and the writer is woken only
    when it waits for the first record of a batch.
    """

    def __init__(self, maxsize: int = LOG_QUEUE) -> None:
        self.maxsize = maxsize
        self._records: deque[Entry] = deque()
        self._ready = threading.Event()  # set: a record came since the writer last looked

    def put_nowait(self, record: Entry) -> None:
        """Queue ``record``; ``queue.Full`` past ``maxsize`` (never blocks)."""
        if len(self._records) >= self.maxsize:
            raise queue.Full
        self._records.append(record)
        if not self._ready.is_set():
            self._ready.set()

    def wake(self) -> None:
        """Have a waiting :meth:`wait` return (to stop)."""
        self._ready.set()

    def wait(self) -> None:
        """Until a record is queued (or :meth:`wake` is called)."""
        self._ready.wait()

    def take(self) -> list[Entry]:
        """Every record queued so far, oldest first."""
        # Cleared before draining: a record queued meanwhile either is drained here or
        # sets the flag again, so the next wait() returns.
        self._ready.clear()
        records = self._records
        return [records.popleft() for _ in range(len(records))]

    def qsize(self) -> int:
        return len(self._records)


class DroppingQueueHandler(logging.Handler):
    """Hands records to the log writer's thread and never blocks the event loop.

    Writing to stderr blocks once nobody reads it (a full pipe): done on the
    loop's thread, that would stop every session. Here a full queue drops the
    record instead, and the count is logged as soon as there is room again.
    (``logging.handlers.QueueHandler`` with a queue of our own.)
    """

    def __init__(self, records: LogQueue) -> None:
        super().__init__()
        self.queue = records
        self.dropped = 0
        #: The formatter the writer makes text lines with, when it is a LineFormatter
        #: (set by whoever sets up the writer): the access log then queues its lines as
        #: text, made by it. None: records only.
        self.lines: LineFormatter | None = None
        #: While the event loop runs (and stderr lets it): the records of the loop's
        #: thread are written by the loop itself (see LoopWriter), not queued.
        self.loop_writer: LoopWriter | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            writer = self.loop_writer
            if writer is not None and writer.on_loop():
                writer.add_record(record)
            else:
                self.enqueue(self.prepare(record))
        except Exception:
            self.handleError(record)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """A copy with its message made, the traceback kept apart.

        QueueHandler's own ``prepare`` appends the traceback to the message, so the
        JSON format would carry it inside ``message``; kept in ``exc_text``, the text
        format still prints it below the line and the JSON one gives it a field.
        (A shallow copy of the attributes: ``copy.copy`` costs three times as much.)
        """
        prepared = logging.LogRecord.__new__(logging.LogRecord)
        prepared.__dict__ = record.__dict__.copy()
        prepared.msg = prepared.message = record.getMessage()
        prepared.args = None
        if record.exc_info:
            prepared.exc_text = record.exc_text or _TRACEBACK.formatException(record.exc_info)
        prepared.exc_info = None
        return prepared

    def enqueue(self, record: Entry) -> None:
        writer = self.loop_writer
        if writer is not None and writer.on_loop():
            if isinstance(record, str):
                writer.add(record)
            else:
                writer.add_record(record)  # (the access log's, in JSON)
            return
        try:
            if self.dropped:
                self.queue.put_nowait(self._dropped_note())
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _dropped_note(self) -> logging.LogRecord:
        return dropped_note(self.dropped)


def dropped_note(count: int) -> logging.LogRecord:
    """The warning that ``count`` log lines were dropped."""
    return logging.LogRecord(
        "replicaproxy",
        logging.WARNING,
        __file__,
        0,
        "%d log lines dropped: the log was not read for a while",
        (count,),
        None,
    )


class LogWriter:
    """The thread that writes queued records to ``handler``, a batch at a time.

    It writes every record waiting, to a ``StreamHandler``'s stream in one write, and
    then at most once per ``batch`` seconds: records that come sooner wait for the
    rest of it. (``QueueListener`` writes each record on its own, and its ``stop``
    waits without a bound: a stuck stderr would then hang the proxy's exit.)
    """

    def __init__(
        self, records: LogQueue, handler: logging.Handler, batch: float = LOG_BATCH
    ) -> None:
        self.records = records
        self.handler = handler
        self.batch = batch
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._write, name="log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _write(self) -> None:
        written = -math.inf  # when the last batch was written (time.monotonic())
        while True:
            self.records.wait()
            pause = written + self.batch - time.monotonic()
            if pause > 0:
                self._stopping.wait(pause)  # let more lines come (not when stopping)
            stopping = self._stopping.is_set()
            batch = self.records.take()
            if batch:
                self._emit(batch)
                written = time.monotonic()
            if stopping and not self.records.qsize():
                return

    def _emit(self, batch: list[Entry]) -> None:
        h = self.handler
        if not isinstance(h, logging.StreamHandler):
            for entry in batch:
                record = _record(entry)
                try:
                    h.handle(record)
                except Exception:  # the writer must outlive a bad record
                    h.handleError(record)
            return
        lines = []
        formatter = h.formatter or logging.Formatter()
        end = h.terminator
        for entry in batch:
            if isinstance(entry, str):
                lines.append(entry + end)
                continue
            try:
                if not h.filters or h.filter(entry):  # (what h.handle would do)
                    lines.append(formatter.format(entry) + end)
            except Exception:
                h.handleError(entry)
        if not lines:
            return
        h.acquire()
        try:
            h.stream.write("".join(lines))
            h.flush()
        except Exception:
            h.handleError(_record(batch[-1]))
        finally:
            h.release()

    def stop(self, timeout: float = 2.0) -> bool:
        """Write what is queued, waiting at most ``timeout`` seconds.

        False: stderr is stuck (nobody reads it); what is still queued is lost.
        """
        if not self._thread.is_alive():
            return True
        self._stopping.set()
        self.records.wake()
        self._thread.join(timeout)
        return not self._thread.is_alive()


class LoopWriter:
    """Log lines written by the event loop's own thread, a batch at a time, with a
    system call that never waits: no thread to hand them to.

    Handing a batch to the writer thread passes the GIL from the loop and back, and
    at a few thousand sessions a second (an access line each) that took a quarter of
    the proxy's throughput; a write from the loop costs what the line does. It
    must never wait for a reader, though, so stderr is written to as follows:

    * a regular file, or a device such as /dev/null, as it is: a write to a file
      waits for no reader;
    * a pipe or a terminal through a descriptor of its own, opened anew with
      O_NONBLOCK (stderr's own, shared with whatever else writes to it, is left
      as it is);
    * a socket (journald's) with MSG_DONTWAIT.

    Anything else gets no LoopWriter (:meth:`open` returns None) and the writer thread
    does it all. What the reader has no room for waits for the next batch; past
    ``most`` lines waiting, new ones are dropped and counted, as the queue does.
    """

    def __init__(
        self,
        send: Callable[[bytes], int],
        loop: asyncio.AbstractEventLoop,
        formatter: logging.Formatter,
        *,
        batch: float = LOG_BATCH,
        most: int = LOG_QUEUE,
        close: Callable[[], None] | None = None,
    ) -> None:
        self._send = send
        self._loop = loop
        self._formatter = formatter
        self.batch = batch
        self.most = most
        self._close = close
        self._thread = threading.get_ident()
        self._lines: list[str] = []
        self._unsent = b""  # what the last write had no room for
        self._timer: asyncio.TimerHandle | None = None
        self._written = -math.inf  # when the last batch was written (loop.time())
        self.dropped = 0
        self.broken = False  # nobody will read: the reader closed its end

    @classmethod
    def open(
        cls, fd: int, loop: asyncio.AbstractEventLoop, formatter: logging.Formatter
    ) -> LoopWriter | None:
        """A LoopWriter for the stream at ``fd`` (stderr), or None where it cannot be
        written without waiting (see the class)."""
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd)):
                return cls(lambda data: os.write(fd, data), loop, formatter)
            if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
                own = os.open(
                    f"/proc/self/fd/{fd}",
                    os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                )
                return cls(lambda data: os.write(own, data), loop, formatter,
                           close=lambda: os.close(own))  # fmt: skip
            if stat.S_ISSOCK(mode):
                sock = socket.socket(fileno=os.dup(fd))
                return cls(lambda data: sock.send(data, socket.MSG_DONTWAIT), loop, formatter,
                           close=sock.close)  # fmt: skip
        except OSError:
            pass  # (no /proc, a FIFO with no reader yet, ...): the writer thread's, then
        return None

    def on_loop(self) -> bool:
        """Whether the caller runs on the loop's thread (only it may add lines)."""
        return threading.get_ident() == self._thread

    def add_record(self, record: logging.LogRecord) -> None:
        """Write ``record``'s line (as the stream handler's formatter makes it)."""
        self.add(self._formatter.format(record))

    def add(self, line: str) -> None:
        """Write ``line`` with the next batch (now, after a quiet spell)."""
        if len(self._lines) >= self.most or self.broken:
            self.dropped += 1
            return
        if self.dropped:
            self._lines.append(self._dropped_note())
            self.dropped = 0
        self._lines.append(line)
        if self._timer is None:
            wait = self._written + self.batch - self._loop.time()
            if wait <= 0:
                self.flush()
            else:
                self._timer = self._loop.call_later(wait, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write what waits, as far as the reader has room."""
        self._written = self._loop.time()
        while True:
            if not self._unsent:
                if not self._lines:
                    return
                text = "\n".join(self._lines) + "\n"
                self._unsent = text.encode("utf-8", "backslashreplace")
                self._lines = []
            try:
                sent = self._send(self._unsent)
            except BlockingIOError:
                sent = 0
            except (BrokenPipeError, ConnectionResetError):
                self.broken = True  # the reader is gone: nothing will read the log again
                sent = len(self._unsent)
            except OSError:  # (a full disk, say): this batch is lost, and counted
                self.dropped += self._unsent.count(b"\n")
                sent = len(self._unsent)
            self._unsent = self._unsent[sent:]
            if self._unsent:
                # No room: the rest is tried again later, and new lines wait (up to most).
                if self._timer is None:
                    self._timer = self._loop.call_later(self.batch, self._tick)
                return
            # (all of it written: then the lines that came while it waited, if any)

    def close(self) -> str:
        """Stop; the text not written yet (for the writer thread, with its bound)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        rest = self._unsent.decode("utf-8", "replace") + "".join(f"{x}\n" for x in self._lines)
        self._unsent = b""
        self._lines = []
        if self._close is not None:
            self._close()
        return rest

    def _dropped_note(self) -> str:
        return self._formatter.format(dropped_note(self.dropped))


class LineFormatter(logging.Formatter):
    """The text lines: ``%(asctime)s %(levelname)s %(name)s: %(message)s``.

    The same text as ``logging.Formatter`` with that format, made with less work:
    each second's date and time once (``strftime`` for every line was a third of
    what writing a line cost), the line itself by an f-string.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        # The last second's date and time, one tuple: the writer thread and the access
        # log (on the event loop's) both use it.
        self._stamp = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time(record.created, record.msecs)

    def _time(self, created: float, msecs: float) -> str:
        second, stamp = self._stamp
        if int(created) != second:
            stamp = time.strftime(self.default_time_format, self.converter(created))
            self._stamp = (int(created), stamp)
        msec_format = self.default_msec_format
        return msec_format % (stamp, msecs) if msec_format else stamp

    def line(self, created_ns: int, levelname: str, name: str, message: str) -> str:
        """The line of a record of ``name`` made at ``created_ns`` (time.time_ns())."""
        when = self._time(created_ns / 1e9, (created_ns % 1_000_000_000) // 1_000_000 + 0.0)
        return f"{when} {levelname} {name}: {message}"

    def format(self, record: logging.LogRecord) -> str:
        """What ``logging.Formatter.format`` makes, without asking which fields it uses."""
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        s = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            s = s + ("" if s[-1:] == "\n" else "\n") + record.exc_text
        if record.stack_info:
            s = s + ("" if s[-1:] == "\n" else "\n") + self.formatStack(record.stack_info)
        return s

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.asctime} {record.levelname} {record.name}: {record.message}"


class AccessLog:
    """The access log: one INFO line per session on ``logger``, made cheaply.

    ``Logger.info`` finds out a record's every attribute anew and formats the
    message from its arguments, and the record then passes the logger's filters,
    each logger up to the root, the handler's lock and its copy of the record: for
    the one line every session writes that was most of what logging it cost. Here
    each record is a copy of one made at the start with the time, the message and
    the session's ``fields`` put in (attributes, as ``extra`` makes them). Where the
    record would reach nothing but the proxy's own queue handler (no filter, no other
    handler on the way: the proxy's setup), it goes on that queue at once; else it is
    handed to ``Logger.handle``, like any record.
    """

    def __init__(self, logger: logging.Logger, fields: tuple[str, ...]) -> None:
        self.logger = logger
        first = logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, "", (), None)
        # Every key a record gets is in the template already: a copy of it then takes
        # them without growing (as good as a third of the cost).
        self._template = {**first.__dict__, **dict.fromkeys(fields), "message": ""}
        # When logging started, in ms: relativeCreated counts from there.
        self._start_ms = first.created * 1e3 - first.relativeCreated

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log_text(self, message: str) -> bool:
        """Queue ``message``'s line as the writer would make it, where the record would
        reach nothing but the queue handler and the writer makes text lines (its
        fields would show nowhere). False: nothing done; :meth:`log` it, with them."""
        queue_handler = self._only_handler()
        if queue_handler is None or queue_handler.lines is None:
            return False
        line = queue_handler.lines.line(time.time_ns(), "INFO", self.logger.name, message)
        queue_handler.enqueue(line)
        return True

    def log(self, message: str, fields: dict[str, object]) -> None:
        """Log ``message`` with ``fields`` (those named at the start) as attributes."""
        ct = time.time_ns()
        queue_handler = self._only_handler()
        if queue_handler is not None and queue_handler.lines is not None:
            # The writer would make this text of the record: no record, no fields (the
            # text format shows none of them).
            queue_handler.enqueue(queue_handler.lines.line(ct, "INFO", self.logger.name, message))
            return
        attrs = self._template.copy()
        attrs["msg"] = attrs["message"] = message
        attrs["created"] = ct / 1e9
        attrs["msecs"] = (ct % 1_000_000_000) // 1_000_000 + 0.0
        attrs["relativeCreated"] = ct / 1e6 - self._start_ms
        attrs.update(fields)
        record = logging.LogRecord.__new__(logging.LogRecord)
        record.__dict__ = attrs
        if queue_handler is None:
            self.logger.handle(record)
        else:
            record.args = None  # (as its prepare() leaves a record: the message is made)
            queue_handler.enqueue(record)

    def _only_handler(self) -> DroppingQueueHandler | None:
        """The queue handler, if it is all an INFO record of ``logger`` reaches."""
        found: DroppingQueueHandler | None = None
        c: logging.Logger | None = self.logger
        while c is not None:
            if c.filters or c.disabled:
                return None
            for h in c.handlers:
                if found is not None or type(h) is not DroppingQueueHandler or h.filters:
                    return None
                if h.level <= logging.INFO:
                    found = h
            if not c.propagate:
                break
            c = c.parent
        return found


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
