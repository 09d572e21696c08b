"""A `WatchSecret` stream handed down to a child whose parent has exited (issue 11 #3).

Launched through ``secretd-shim --function orders``: this process (P) is a registered worker.
P opens a plain Unix connection to the broker and waits until the broker has accepted it, then
forks a child (C) that inherits the connected socket *before* any gRPC state exists. P runs a
small proxy onto that connection and opens a real watch through it with the Python client;
once the first value has arrived, P reports and, on ``{"op": "exit"}``, exits abruptly (no
RST_STREAM, no GOAWAY: the kernel just drops P's descriptors).

C waits until P is gone and re-parented, then reads the raw HTTP/2 bytes the broker sends on
the inherited connection — everything the broker would still deliver on P's watch. On
``{"op": "report"}`` it answers with those bytes (hex) and whether the connection ended. The
test rotates the secret in between and looks for the new value in them.

argv: SECRET_NAME PROXY_SOCKET_PATH
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import sys
import threading
from typing import Any


def emit(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def pump(src: socket.socket, dst: socket.socket) -> None:
    # Never shut the upstream down: it is shared with C, and a half-close would end the watch
    # for reasons of our own rather than the broker's.
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass


def watch_through(upstream: socket.socket, name: str, proxy_path: str) -> None:
    # grpc is imported only here, in P, after the fork: C never holds any gRPC state.
    import secretd

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(proxy_path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        threading.Thread(target=pump, args=(conn, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    client = secretd.Client(socket_path=proxy_path, timeout=10.0)
    values = client.watch_bytes(name)
    first = next(values)
    emit({"op": "watching", "pid": os.getpid(), "sha256": hashlib.sha256(first).hexdigest()})
    sys.stdin.readline()
    os._exit(0)


def read_inherited(upstream: socket.socket, parent: int, gone: int) -> None:
    # P holds the write end of `gone`: EOF means P has exited.
    while os.read(gone, 1):
        pass
    while os.getppid() == parent:
        select.select([], [], [], 0.02)
    emit({"op": "orphaned", "pid": os.getpid()})
    received = b""
    ended = False
    stdin = sys.stdin.fileno()
    while True:
        waiting = [stdin] if ended else [stdin, upstream.fileno()]
        ready, _, _ = select.select(waiting, [], [], 30.0)
        if upstream.fileno() in ready:
            try:
                chunk = upstream.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                received += chunk
            else:
                ended = True
        if stdin in ready:
            sys.stdin.readline()
            emit({"op": "report", "received": received.hex(), "ended": ended})
            return


def main() -> None:
    name, proxy_path = sys.argv[1:3]
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.connect(os.environ["SECRETD_SOCKET"])
    ready, _, _ = select.select([upstream], [], [], 20.0)
    if not (ready and upstream.recv(1, socket.MSG_PEEK)):
        emit({"op": "error", "message": "broker never accepted the connection"})
        return
    gone_r, gone_w = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(gone_w)
        read_inherited(upstream, parent, gone_r)
        return
    os.close(gone_r)
    emit({"op": "forked", "child": child})
    watch_through(upstream, name, proxy_path)


if __name__ == "__main__":
    main()
