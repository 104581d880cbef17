"""A demo-protocol server that crashes right after sending its ``HOLA``.

It reads the first message, replies, and exits at once (``os._exit``), the way
a process dies mid-session: the kernel closes its socket with FIN. Run:
``python crashing_server.py``; it logs ``listening on HOST:PORT`` on stderr.
"""

from __future__ import annotations

import os
import socket
import sys

from replicaproxy.demo.protocol import FIRST_MESSAGE, REPLY


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    host, port = listener.getsockname()[:2]
    print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
    while True:
        conn, _ = listener.accept()
        got = b""
        while len(got) < len(FIRST_MESSAGE):
            data = conn.recv(len(FIRST_MESSAGE) - len(got))
            if not data:
                break  # a health check: connect and close
            got += data
        if len(got) < len(FIRST_MESSAGE):
            conn.close()
            continue
        conn.sendall(REPLY)
        print("crashing after the reply", file=sys.stderr, flush=True)
        os._exit(1)


if __name__ == "__main__":
    main()
