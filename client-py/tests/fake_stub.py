"""In-memory stand-ins for the generated secretd.v1.Secrets stub, passed in as `stub=`.

They speak the same messages and raise `grpc.RpcError`s carrying a `grpc.StatusCode`, which is
all the client sees of a real broker. Nothing in the client is patched.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any, Union

import grpc

from secretd._proto import secretd_pb2 as pb


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "fake") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


Event = Union[pb.Secret, grpc.StatusCode, None]  # None = the stream ends cleanly


class FakeWatch:
    """A WatchSecret stream fed by the test through `push()`."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.cancelled = threading.Event()

    def push(self, event: Event) -> None:
        self.events.put(event)

    def __iter__(self) -> Iterator[pb.Secret]:
        return self

    def __next__(self) -> pb.Secret:
        event = self.events.get(timeout=30)
        if self.cancelled.is_set():
            raise FakeRpcError(grpc.StatusCode.CANCELLED, "cancelled")
        if event is None:
            raise StopIteration
        if isinstance(event, grpc.StatusCode):
            raise FakeRpcError(event)
        return event

    def cancel(self) -> bool:
        self.cancelled.set()
        self.events.put(None)
        return True


class FakeStub:
    """Secrets by name; `denied` names answer PERMISSION_DENIED; `fail` is a queue of status
    codes that the next calls raise, one each, before answering normally."""

    def __init__(self, secrets: dict[str, bytes] | None = None, denied: set[str] | None = None):
        self.secrets = dict(secrets or {})
        self.versions = dict.fromkeys(self.secrets, 1)
        self.denied = set(denied or ())
        self.fail: deque[grpc.StatusCode] = deque()
        self.calls: list[tuple[str, Any]] = []
        self.timeouts: list[float | None] = []
        self.watches: list[FakeWatch] = []
        self.watch_opened = threading.Condition()
        self.lock = threading.Lock()

    def set(self, name: str, value: bytes) -> pb.Secret:
        self.secrets[name] = value
        self.versions[name] = self.versions.get(name, 0) + 1
        return pb.Secret(name=name, value=value, version=self.versions[name])

    def _enter(self, rpc: str, request: Any, timeout: float | None) -> None:
        with self.lock:
            self.calls.append((rpc, request))
            self.timeouts.append(timeout)
            code = self.fail.popleft() if self.fail else None
        if code is not None:
            raise FakeRpcError(code)

    def _secret(self, name: str) -> pb.Secret:
        if name in self.denied:
            raise FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "permission denied")
        if name not in self.secrets:
            raise FakeRpcError(grpc.StatusCode.NOT_FOUND, "not found")
        return pb.Secret(name=name, value=self.secrets[name], version=self.versions[name])

    def count(self, rpc: str) -> int:
        return sum(1 for r, _ in self.calls if r == rpc)

    def GetSecret(self, request: pb.GetSecretRequest, timeout: float | None = None) -> pb.Secret:
        self._enter("GetSecret", request, timeout)
        return self._secret(request.name)

    def GetSecrets(
        self, request: pb.GetSecretsRequest, timeout: float | None = None
    ) -> pb.GetSecretsResponse:
        self._enter("GetSecrets", request, timeout)
        return pb.GetSecretsResponse(secrets=[self._secret(n) for n in request.names])

    def ListSecrets(
        self, request: pb.ListSecretsRequest, timeout: float | None = None
    ) -> pb.ListSecretsResponse:
        self._enter("ListSecrets", request, timeout)
        return pb.ListSecretsResponse(names=sorted(set(self.secrets) - self.denied))

    def WhoAmI(self, request: pb.WhoAmIRequest, timeout: float | None = None) -> pb.WhoAmIResponse:
        self._enter("WhoAmI", request, timeout)
        return pb.WhoAmIResponse(pid=42, uid=1001, gid=1001, scopes=["orders"], exe="/usr/bin/py")

    def WatchSecret(self, request: pb.WatchSecretRequest) -> FakeWatch:
        with self.lock:
            self.calls.append(("WatchSecret", request))
        watch = FakeWatch()
        with self.watch_opened:
            self.watches.append(watch)
            self.watch_opened.notify_all()
        return watch

    def wait_watches(self, n: int, timeout: float = 10.0) -> FakeWatch:
        """Block until `n` watches were opened; return the n-th."""
        with self.watch_opened:
            if not self.watch_opened.wait_for(lambda: len(self.watches) >= n, timeout):
                raise AssertionError(f"expected {n} WatchSecret calls, saw {len(self.watches)}")
            return self.watches[n - 1]


async def _Awaitable(fn: Any) -> Any:
    return fn()


class AsyncFakeWatch:
    def __init__(self, events: list[Event]) -> None:
        self.events = list(events)
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[pb.Secret]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[pb.Secret]:
        for event in self.events:
            if event is None:
                return
            if isinstance(event, grpc.StatusCode):
                raise FakeRpcError(event)
            yield event

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class AsyncFakeStub:
    """The FakeStub behind grpc.aio's calling convention (calls return awaitables)."""

    def __init__(self, sync: FakeStub) -> None:
        self.sync = sync
        self.watch_scripts: deque[list[Event]] = deque()

    def GetSecret(self, request: pb.GetSecretRequest, timeout: float | None = None) -> Any:
        return _Awaitable(lambda: self.sync.GetSecret(request, timeout))

    def GetSecrets(self, request: pb.GetSecretsRequest, timeout: float | None = None) -> Any:
        return _Awaitable(lambda: self.sync.GetSecrets(request, timeout))

    def ListSecrets(self, request: pb.ListSecretsRequest, timeout: float | None = None) -> Any:
        return _Awaitable(lambda: self.sync.ListSecrets(request, timeout))

    def WhoAmI(self, request: pb.WhoAmIRequest, timeout: float | None = None) -> Any:
        return _Awaitable(lambda: self.sync.WhoAmI(request, timeout))

    def WatchSecret(self, request: pb.WatchSecretRequest) -> AsyncFakeWatch:
        self.sync.calls.append(("WatchSecret", request))
        return AsyncFakeWatch(self.watch_scripts.popleft())
