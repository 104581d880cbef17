"""Small logging helpers shared by the server and the CLI."""

from __future__ import annotations

import errno
import logging
import os
import time


def one_line(text: str) -> str:
    """``text`` with every control character (a newline, an escape sequence) escaped.

    For messages that quote what a user typed: a path or word holding a newline
    can then neither split the line nor reach the terminal raw.
    """
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class RateLimited:
    """Let a kind of log line through at most once per ``interval`` seconds.

    Lines held back are counted, and the count is added to the next line that
    goes through, so a flood is visible without drowning the log.
    """

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            logger.log(level, msg + " (%d more like this not logged)", *args, held)
        else:
            logger.log(level, msg, *args)


#: Errors that are this machine's shortage, not a backend's failure: they must
#: never make a backend stale or trigger a failover (connects and health checks).
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)


def describe_error(exc: BaseException) -> str:
    """A short, stable description of an I/O error: ``Connection refused``, not a repr.

    asyncio wraps connect errors as ``OSError(errno, "Connect call failed ...")``;
    the errno says what happened, so it wins over the message.
    """
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
