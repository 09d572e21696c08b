"""A function worker for the end-to-end suite, driven one JSON line at a time.

Runs on the system interpreter as an unprivileged uid, from a staged world-readable copy of
the client (this file sits beside ``secretd/``, so no PYTHONPATH is needed and the environment
stays exactly what the shim built). Replies never carry a value: only its SHA-256 and length,
which is all the tests need to prove the right secret arrived.

Ops: get, get_str, get_many, list, whoami, raw_get (bypasses the client), orphan (a grandchild
that daemonizes asks who it is), handoff (a child takes over stdio), fds (open descriptors),
watch/watch_next (follow a WatchSecret stream), spawn (start a child running this same
program), child (forward one op to it), exit. ``--child`` marks the spawned copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import Any

import grpc

import secretd
from secretd._proto import secretd_pb2 as pb
from secretd._proto import secretd_pb2_grpc as pb_grpc

# Runs as `python -c`: forks, the middle process exits, the grandchild waits until it has been
# re-parented and then asks the broker who it is with a fresh client.
ORPHAN = """
import json, os, sys, time
sys.path.insert(0, LIB)
parent = os.getpid()
if os.fork():
    os._exit(0)
while os.getppid() == parent:
    time.sleep(0.01)
import secretd
out = {"pid": os.getpid(), "ppid": os.getppid()}
me = secretd.whoami()
out.update(function=me.function or "", scopes=list(me.scopes))
try:
    secretd.get("ORDERS_DB")
    out["get"] = "ok"
except secretd.SecretdError as exc:
    out["get"] = type(exc).__name__
print(json.dumps(out), flush=True)
"""


def orphan() -> dict[str, Any]:
    lib = os.path.dirname(os.path.abspath(__file__))
    script = f"LIB = {lib!r}\n{ORPHAN}"
    done = subprocess.run(
        [sys.executable, "-s", "-E", "-c", script], stdout=subprocess.PIPE, timeout=60, check=True
    )
    reply: dict[str, Any] = json.loads(done.stdout)
    return {"ok": True, **reply}


class Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-E", os.path.abspath(__file__), "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.hello = self.read()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("child closed its stdout")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()
        return self.read()


def digest(value: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(value).hexdigest(), "len": len(value)}


def raw_get(name: str) -> dict[str, Any]:
    """GetSecret on the generated stub, bypassing the client's own name check.

    Shows what the *broker* answers to a name the client would refuse to send.
    """
    channel = grpc.insecure_channel(
        f"unix://{os.environ['SECRETD_SOCKET']}",
        options=[("grpc.default_authority", "localhost")],
    )
    with channel:
        stub = pb_grpc.SecretsStub(channel)  # type: ignore[no-untyped-call]
        try:
            secret = stub.GetSecret(pb.GetSecretRequest(name=name), timeout=10.0)
        except grpc.RpcError as err:
            code: Any = getattr(err, "code", lambda: None)()
            details: Any = getattr(err, "details", lambda: None)()
            return {"ok": False, "code": getattr(code, "name", "UNKNOWN"), "details": details}
    return {"ok": True, **digest(secret.value)}


class Watch:
    """One WatchSecret stream, followed in a thread; each event waits in a queue."""

    def __init__(self, client: secretd.Client, name: str) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = client
        self.name = name
        threading.Thread(target=self.follow, daemon=True).start()

    def follow(self) -> None:
        try:
            for value in self.client.watch_bytes(self.name):
                self.events.put({"ok": True, **digest(value)})
            self.events.put({"ok": False, "error": "WatchEnded", "message": "stream ended"})
        except secretd.SecretdError as exc:
            self.events.put({"ok": False, "error": type(exc).__name__, "message": str(exc)})

    def next(self, timeout: float) -> dict[str, Any]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return {"ok": False, "error": "NoEvent", "message": f"nothing within {timeout}s"}


class Worker:
    def __init__(self) -> None:
        self._client: secretd.Client | None = None
        self.child: Child | None = None
        self.watches: dict[str, Watch] = {}

    @property
    def client(self) -> secretd.Client:
        # One client for the worker's life: a broker restart must be survived by the same one.
        if self._client is None:
            self._client = secretd.Client()
        return self._client

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message["op"]
        if op == "get":
            return {"ok": True, **digest(self.client.get_bytes(message["name"]))}
        if op == "get_str":
            return {"ok": True, **digest(self.client.get(message["name"]).encode())}
        if op == "get_many":
            values = self.client.get_many(message["names"])
            return {"ok": True, "values": {k: digest(v.encode()) for k, v in values.items()}}
        if op == "list":
            return {"ok": True, "names": list(self.client.list())}
        if op == "whoami":
            me = self.client.whoami()
            return {
                "ok": True,
                "pid": me.pid,
                "uid": me.uid,
                "gid": me.gid,
                "function": me.function or "",
                "scopes": list(me.scopes),
                "exe": me.exe,
            }
        if op == "raw_get":
            return raw_get(message["name"])
        if op == "orphan":
            return orphan()
        if op == "handoff":
            # The child takes over this process's stdin/stdout (it says hello itself); this
            # process stops reading and just stays alive until it is killed.
            subprocess.Popen([sys.executable, "-s", "-E", os.path.abspath(__file__), "--child"])
            while True:
                signal.pause()
        if op == "fds":
            fds = {}
            for fd in os.listdir("/proc/self/fd"):
                try:
                    fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:  # the directory listing's own fd, closed by now
                    continue
            return {"ok": True, "fds": fds}
        if op == "watch":
            self.watches[message["name"]] = Watch(self.client, message["name"])
            return {"ok": True}
        if op == "watch_next":
            return self.watches[message["name"]].next(float(message.get("timeout", 20.0)))
        if op == "spawn":
            if self.child is None:
                self.child = Child()
            return {"ok": True, "pid": self.child.proc.pid}
        if op == "child":
            if self.child is None:
                return {"ok": False, "error": "NoChild", "message": "spawn first"}
            return self.child.request(message["message"])
        raise ValueError(f"unknown op {op!r}")

    def serve(self) -> None:
        hello = {"op": "hello", "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
        print(json.dumps(hello), flush=True)
        for line in sys.stdin:
            message = json.loads(line)
            if message["op"] == "exit":
                if self.child is not None:
                    self.child.request({"op": "exit"})
                    self.child.proc.wait()
                print(json.dumps({"ok": True}), flush=True)
                return
            try:
                reply = self.handle(message)
            except secretd.SecretdError as exc:
                reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            except Exception as exc:  # reported to the test, which fails with it
                reply = {"ok": False, "error": type(exc).__name__, "message": repr(exc)}
            print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    Worker().serve()
