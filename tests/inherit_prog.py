"""The inherited-socket case (SPIRE's regression test), as a real process tree.

Launched through ``secretd-shim --function orders``, so this process (P) is a registered
worker. P opens a plain Unix connection to the broker — no gRPC yet — and waits until the
broker has accepted it (the server's HTTP/2 SETTINGS frame is waiting, seen with MSG_PEEK
without consuming it). P then forks a child (G) that inherits the connected socket.

``exit`` mode: P exits; G waits until it has been re-parented, then makes a gRPC call over
the inherited connection. The broker still has P's credentials for that connection (SO_PEERCRED
is fixed at connect time) and must not hand G the function's secrets.
``stay`` mode: P stays alive until G is done — the control showing the mechanism works.

gRPC cannot take a file descriptor, so G runs a tiny proxy: a listening socket in its own
directory whose first accepted connection is spliced byte for byte onto the inherited one,
and points the real client at it. Protocol: one JSON line per event on stdout; G waits for
one line on stdin before calling (the test sends it after reaping P).

argv: MODE SECRET_NAME PROXY_SOCKET_PATH
"""

from __future__ import annotations

import contextlib
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
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def serve_proxy(listener: socket.socket, upstream: socket.socket) -> None:
    conn, _ = listener.accept()
    threading.Thread(target=pump, args=(conn, upstream), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
    # Any reconnect gets a closed connection: there is only one inherited socket.
    while True:
        extra, _ = listener.accept()
        extra.close()


def call_over(upstream: socket.socket, name: str, proxy_path: str) -> dict[str, Any]:
    # grpc is imported only here, in G, after the fork: no gRPC state ever crosses a fork.
    import secretd

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(proxy_path)
    listener.listen(4)
    threading.Thread(target=serve_proxy, args=(listener, upstream), daemon=True).start()
    result: dict[str, Any] = {"op": "result", "pid": os.getpid(), "ppid": os.getppid()}
    try:
        with secretd.Client(socket_path=proxy_path, timeout=10.0) as client:
            value = client.get_bytes(name)
        result.update(ok=True, sha256=hashlib.sha256(value).hexdigest())
    except secretd.SecretdError as exc:
        result.update(ok=False, error=type(exc).__name__, message=str(exc))
    return result


def main() -> None:
    mode, name, proxy_path = sys.argv[1:4]
    socket_path = os.environ["SECRETD_SOCKET"]
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.connect(socket_path)
    # The broker has accepted (and attested) the connection once its first frame is waiting.
    ready, _, _ = select.select([upstream], [], [], 20.0)
    accepted = bool(ready) and bool(upstream.recv(1, socket.MSG_PEEK))
    parent = os.getpid()
    child = os.fork()
    if child:
        emit({"op": "forked", "parent": parent, "child": child, "accepted": accepted})
        if mode == "exit":
            os._exit(0)
        os.waitpid(child, 0)
        return
    if mode == "exit":
        while os.getppid() == parent:
            select.select([], [], [], 0.02)
    sys.stdin.readline()
    emit(call_over(upstream, name, proxy_path))


if __name__ == "__main__":
    main()
