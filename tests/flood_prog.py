"""A connection flooder for the fair-share tests (issue 11 #5), run as an unprivileged uid.

Reads one JSON command per line on stdin, answers one JSON line on stdout:
  {"op": "open", "count": N, "kind": K}   open N connections to $SECRETD_SOCKET, where K is
      "idle"      connect and send nothing (the free 1,024-connection lock-out of today),
      "preface"   send the HTTP/2 client preface and stop (a half handshake),
      "settings"  send the preface and an empty SETTINGS frame: a complete handshake, no stream.
  {"op": "status"}   how many of the connections the broker has closed so far (read EOF).
  {"op": "exit"}
Never sends a request: this process holds connections, nothing else.

argv: SOCKET_PATH
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def emit(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


class Conn:
    def __init__(self, path: str, kind: str) -> None:
        self.kind = kind
        self.closed = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        hello = {"idle": b"", "preface": PREFACE, "settings": PREFACE + EMPTY_SETTINGS}[kind]
        try:
            self.sock.sendall(hello)
        except OSError:
            self.closed = True  # already closed by the broker (over a share)
        self.sock.setblocking(False)

    def poll(self) -> bool:
        """Drain what the broker sent; True once it has closed the connection."""
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
        return self.closed


def main() -> None:
    path = sys.argv[1]
    conns: list[Conn] = []
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "open":
            opened = 0
            for _ in range(int(command["count"])):
                try:
                    conns.append(Conn(path, str(command["kind"])))
                    opened += 1
                except OSError as exc:
                    emit({"op": "open", "opened": opened, "error": str(exc)})
                    break
            else:
                emit({"op": "open", "opened": opened})
        elif op == "status":
            by_kind: dict[str, dict[str, int]] = {}
            for conn in conns:
                counts = by_kind.setdefault(conn.kind, {"open": 0, "closed": 0})
                counts["closed" if conn.poll() else "open"] += 1
            closed = sum(1 for c in conns if c.closed)
            emit(
                {"op": "status", "closed": closed, "open": len(conns) - closed, "by_kind": by_kind}
            )
        elif op == "exit":
            return


if __name__ == "__main__":
    main()
