"""The synchronous client: one gRPC channel to the broker's Unix socket.

Trust: the broker decides who may read what from the kernel's peer credentials of this
process; nothing this client sends claims an identity. Guarantees: values are returned to the
caller and kept nowhere else except the optional in-process cache (`cache_ttl`); no exception,
repr or log line contains one. A `Client` is safe to share between threads. It is not usable
after `os.fork()` in the child: create clients after forking (the module-level functions do).
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from types import TracebackType
from typing import Callable, Protocol, TypeVar

import grpc

from . import errors
from ._common import (
    Identity,
    PathLike,
    Retry,
    channel_options,
    check_name,
    check_names,
    check_timeout,
    decode,
    fork_error,
    resolve_socket,
)
from ._proto import secretd_pb2 as pb
from ._proto import secretd_pb2_grpc as pb_grpc
from .errors import SecretdError

__all__ = ["Client", "SecretsStub", "WatchCall"]

log = logging.getLogger("secretd")

T = TypeVar("T")


class WatchCall(Protocol):
    """What `SecretsStub.WatchSecret` returns: an iterator of `Secret` that can be cancelled."""

    def __iter__(self) -> Iterator[pb.Secret]: ...

    def __next__(self) -> pb.Secret: ...

    def cancel(self) -> bool: ...


class SecretsStub(Protocol):
    """The part of the generated `secretd.v1.Secrets` stub the client uses.

    `Client(stub=...)` accepts any object of this shape (tests pass fakes); failures are raised
    as `grpc.RpcError` whose `code()` is a `grpc.StatusCode`.
    """

    def GetSecret(self, request: pb.GetSecretRequest, timeout: float | None = ...) -> pb.Secret: ...

    def GetSecrets(
        self, request: pb.GetSecretsRequest, timeout: float | None = ...
    ) -> pb.GetSecretsResponse: ...

    def ListSecrets(
        self, request: pb.ListSecretsRequest, timeout: float | None = ...
    ) -> pb.ListSecretsResponse: ...

    def WhoAmI(
        self, request: pb.WhoAmIRequest, timeout: float | None = ...
    ) -> pb.WhoAmIResponse: ...

    def WatchSecret(self, request: pb.WatchSecretRequest) -> WatchCall: ...


class _Entry:
    """One cached value. Deliberately no __repr__ beyond object's: it holds a value."""

    __slots__ = ("call", "fetched", "value", "version", "watching")

    def __init__(self, value: bytes, version: int, fetched: float) -> None:
        self.value = value
        self.version = version
        self.fetched = fetched
        self.watching = False
        self.call: WatchCall | None = None


class Client:
    """A connection to the secretd broker.

    Args:
        socket_path: the broker's socket; default ``$SECRETD_SOCKET``, else
            ``/run/secretd/secretd.sock``.
        timeout: seconds each call may take once connected (None: no limit).
        cache_ttl: keep values in this process for up to this many seconds (default: no
            cache). While a cached name is being watched (`WatchSecret`), rotations replace the
            cached value as they happen and the entry does not expire; if the watch ends, the
            entry expires `cache_ttl` seconds after it was last confirmed. A name whose scope is
            revoked or which is deleted is dropped from the cache at once.
        retry: how long to keep trying while the broker is unavailable (see `Retry`).
        stub: for tests: an object shaped like the generated stub (`SecretsStub`) to use
            instead of opening a channel.

    The client is a context manager; `close()` releases the channel and stops watches.
    """

    def __init__(
        self,
        socket_path: PathLike | None = None,
        timeout: float | None = 5.0,
        *,
        cache_ttl: float | None = None,
        retry: Retry = Retry(),  # noqa: B008 (frozen, immutable)
        stub: SecretsStub | None = None,
    ) -> None:
        self._socket_path = resolve_socket(socket_path)
        self._timeout = check_timeout(timeout)
        if cache_ttl is not None and cache_ttl < 0:
            raise ValueError("cache_ttl must be >= 0 seconds, or None")
        self._cache_ttl = cache_ttl or None
        self._retry = retry
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._cache: dict[str, _Entry] = {}
        self._channel: grpc.Channel | None = None
        if stub is None:
            self._channel = grpc.insecure_channel(
                f"unix://{self._socket_path}", options=channel_options()
            )
            stub = pb_grpc.SecretsStub(self._channel)  # type: ignore[no-untyped-call]
        self._stub: SecretsStub = stub

    @property
    def socket_path(self) -> str:
        return self._socket_path

    @property
    def timeout(self) -> float | None:
        return self._timeout

    def __repr__(self) -> str:
        cache = f" cache_ttl={self._cache_ttl}" if self._cache_ttl else ""
        state = " closed" if self._closed else ""
        return (
            f"<secretd.Client socket={self._socket_path!r} timeout={self._timeout}{cache}{state}>"
        )

    # -- the calls -----------------------------------------------------------------------

    def get(self, name: str) -> str:
        """The secret `name` as UTF-8 text."""
        return decode(name, self.get_bytes(name))

    def get_bytes(self, name: str) -> bytes:
        """The secret `name` as bytes."""
        check_name(name)
        self._check_usable()
        if self._cache_ttl is not None:
            cached = self._cached(name)
            if cached is not None:
                return cached
        request = pb.GetSecretRequest(name=name)
        secret = self._call(
            "GetSecret", name, lambda: self._stub.GetSecret(request, timeout=self._timeout)
        )
        if self._cache_ttl is not None:
            self._store(name, secret.value, secret.version)
        return secret.value

    def get_many(self, names: Iterable[str]) -> dict[str, str]:
        """Several secrets in one call, as text: all of them, or one error for the whole call."""
        return {name: decode(name, value) for name, value in self._get_many(names).items()}

    def _get_many(self, names: Iterable[str]) -> dict[str, bytes]:
        wanted = check_names(names)
        self._check_usable()
        if not wanted:
            return {}
        label = wanted[0] if len(wanted) == 1 else None
        request = pb.GetSecretsRequest(names=wanted)
        response = self._call(
            "GetSecrets", label, lambda: self._stub.GetSecrets(request, timeout=self._timeout)
        )
        got = {secret.name: secret.value for secret in response.secrets}
        missing = [name for name in wanted if name not in got]
        if missing:
            raise SecretdError(
                f"secretd: the broker's answer to GetSecrets lacks {missing!r}", code="INTERNAL"
            )
        if self._cache_ttl is not None:
            for secret in response.secrets:
                self._store(secret.name, secret.value, secret.version)
        return {name: got[name] for name in wanted}

    def list(self) -> builtins.list[str]:
        """Names of the secrets this process may read (never values), sorted."""
        self._check_usable()
        request = pb.ListSecretsRequest()
        response = self._call(
            "ListSecrets", None, lambda: self._stub.ListSecrets(request, timeout=self._timeout)
        )
        return builtins.list(response.names)

    def whoami(self) -> Identity:
        """What the broker knows about this process: pid, uid, gid, function, scopes."""
        self._check_usable()
        request = pb.WhoAmIRequest()
        r = self._call("WhoAmI", None, lambda: self._stub.WhoAmI(request, timeout=self._timeout))
        return Identity(
            pid=r.pid,
            uid=r.uid,
            gid=r.gid,
            function=r.function or None,
            scopes=tuple(r.scopes),
            exe=r.exe,
        )

    def watch(self, name: str) -> Generator[str, None, None]:
        """The current value of `name`, then each new value as it is rotated, as text.

        Survives a broker restart (reconnects within the `retry` budget and skips a repeat of
        the value it last yielded). Ends with `PermissionDenied` when a policy reload takes the
        scope away and `NotFound` when the secret is deleted. Stop it by leaving the loop.
        """
        for value in self.watch_bytes(name):
            yield decode(name, value)

    def watch_bytes(self, name: str) -> Generator[bytes, None, None]:
        """Like `watch`, as bytes."""
        check_name(name)
        self._check_usable()
        request = pb.WatchSecretRequest(name=name)
        last: bytes | None = None
        delays: Iterator[float] | None = None
        retried = 0.0
        while True:
            failure: SecretdError | None = None
            first = True
            call = self._call("WatchSecret", name, lambda: self._stub.WatchSecret(request))
            try:
                for secret in call:
                    delays, retried = None, 0.0
                    if first and last is not None and secret.value == last:
                        first = False
                        continue  # the current value re-sent after a reconnect
                    first = False
                    last = secret.value
                    yield last
            except grpc.RpcError as err:
                if errors.status_name(err) != "UNAVAILABLE":
                    failure = self._error(err, "WatchSecret", name)
            finally:
                call.cancel()
            if failure is not None:
                raise failure
            # The stream broke or ended (broker restarting): reconnect within the retry budget.
            self._check_usable()
            if delays is None:
                delays = self._retry.delays()
            delay = next(delays, None)
            if delay is None:
                raise errors.unavailable(self._socket_path, "the watch stream broke", retried)
            log.debug("secretd: watch of %r interrupted; reconnecting in %.2f s", name, delay)
            time.sleep(delay)
            retried += delay

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop watches and close the channel. Further calls raise `SecretdError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            entries = builtins.list(self._cache.values())
            self._cache.clear()
        for entry in entries:
            if entry.call is not None:
                entry.call.cancel()
        if self._channel is not None and os.getpid() == self._pid:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if os.getpid() != self._pid:
            raise fork_error(self._pid)
        if self._closed:
            raise SecretdError("secretd: this client is closed")

    def _error(
        self, err: BaseException, rpc: str, name: str | None, retried: float = 0.0
    ) -> SecretdError:
        return errors.from_rpc_error(
            err,
            rpc=rpc,
            name=name,
            socket_path=self._socket_path,
            timeout=self._timeout,
            retried_for=retried,
        )

    def _call(self, rpc: str, name: str | None, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying UNAVAILABLE within the retry budget; map any failure."""
        delays: Iterator[float] | None = None  # made on the first failure: the fast path is bare
        retried = 0.0
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                delay = None
                if errors.status_name(err) == "UNAVAILABLE":
                    if delays is None:
                        delays = self._retry.delays()
                    delay = next(delays, None)
                failure = None if delay is not None else self._error(err, rpc, name, retried)
            if failure is not None:
                # Raised here, outside the except block, so grpc's error is not chained on.
                raise failure
            assert delay is not None
            log.debug("secretd: broker unavailable for %s; retrying in %.2f s", rpc, delay)
            time.sleep(delay)
            retried += delay
            self._check_usable()

    # -- cache (cache_ttl) ---------------------------------------------------------------

    def _cached(self, name: str) -> bytes | None:
        assert self._cache_ttl is not None
        with self._lock:
            entry = self._cache.get(name)
            if entry is None:
                return None
            if entry.watching or time.monotonic() - entry.fetched < self._cache_ttl:
                return entry.value
            return None

    def _store(self, name: str, value: bytes, version: int) -> None:
        with self._lock:
            if self._closed:
                return
            entry = self._cache.get(name)
            if entry is None:
                entry = self._cache[name] = _Entry(value, version, time.monotonic())
            elif version >= entry.version or not entry.watching:
                entry.value, entry.version, entry.fetched = value, version, time.monotonic()
            if entry.watching:
                return
            entry.watching = True
        thread = threading.Thread(
            target=self._keep_fresh, args=(name, entry), name=f"secretd-watch-{name}", daemon=True
        )
        thread.start()

    def _keep_fresh(self, name: str, entry: _Entry) -> None:
        """Follow one cached name's WatchSecret stream until it ends; runs in its own thread."""
        drop = False
        try:
            call = self._stub.WatchSecret(pb.WatchSecretRequest(name=name))
            with self._lock:
                if self._closed or self._cache.get(name) is not entry:
                    call.cancel()
                    return
                entry.call = call
            for secret in call:
                with self._lock:
                    entry.value, entry.version = secret.value, secret.version
                    entry.fetched = time.monotonic()
        except grpc.RpcError as err:
            # Scope revoked or secret deleted: forget the value now. Anything else (broker
            # restarting, UNIMPLEMENTED by an older broker, close()): fall back to the TTL.
            drop = errors.status_name(err) in ("PERMISSION_DENIED", "NOT_FOUND")
            log.debug("secretd: cache watch of %r ended (%s)", name, errors.status_name(err))
        finally:
            with self._lock:
                entry.watching = False
                entry.call = None
                if drop and self._cache.get(name) is entry:
                    del self._cache[name]
