"""A backend that misbehaves on purpose, for the bad-peer fault tests.

``python rogue.py MODE [--port N]``; it logs ``listening on HOST:PORT`` on stderr and one
line per connection on stdout (``conn N MODE``). Modes:

* ``reset``: accept, then close with a reset (SO_LINGER 0) before reading anything.
* ``garbage``: send garbage bytes at once, before any request; then answer every chunk
  received with more garbage.
* ``half-close``: send EOF at once (``shutdown(SHUT_WR)``), then read until the peer closes.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import sys
import threading

GARBAGE = b"\x00\xff-GARBAGE\r\n\x1b[0m"
_count = iter(range(1 << 62))
_lock = threading.Lock()


class Handler(socketserver.BaseRequestHandler):
    mode = "reset"

    def handle(self) -> None:
        s: socket.socket = self.request
        with _lock:
            n = next(_count)
        print(f"conn {n} {self.mode}", flush=True)
        with contextlib.suppress(OSError):
            if self.mode == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.mode == "garbage":
                s.sendall(GARBAGE)
                while s.recv(65536):
                    s.sendall(GARBAGE)
            elif self.mode == "half-close":
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass


def main() -> None:
    mode = sys.argv[1]
    if mode not in ("reset", "garbage", "half-close"):
        raise SystemExit(f"unknown mode {mode!r}")
    port = int(sys.argv[sys.argv.index("--port") + 1]) if "--port" in sys.argv else 0
    Handler.mode = mode
    socketserver.ThreadingTCPServer.daemon_threads = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler) as server:
        host, bound = server.socket.getsockname()[:2]
        print(f"listening on {host}:{bound}", file=sys.stderr, flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
