"""The asyncio client (`grpc.aio`): the same calls as `secretd.Client`, as coroutines.

    async with secretd.aio.Client() as client:
        dsn = await client.get("ORDERS_DB")

The channel is opened on first use inside the running event loop, so a client may be created
at import time. Use one client per event loop. Errors, retries and the fork rule are those of
`secretd.Client`; there is no in-process cache here (`cache_ttl` is a `secretd.Client` feature).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Iterator
from types import TracebackType
from typing import Callable, Protocol, TypeVar

import grpc
import grpc.aio

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

__all__ = ["AsyncSecretsStub", "AsyncWatchCall", "Client"]

log = logging.getLogger("secretd")

T = TypeVar("T")


class AsyncWatchCall(Protocol):
    """What `AsyncSecretsStub.WatchSecret` returns: an async iterator that can be cancelled."""

    def __aiter__(self) -> AsyncIterator[pb.Secret]: ...

    def cancel(self) -> bool: ...


class AsyncSecretsStub(Protocol):
    """The generated stub bound to a `grpc.aio` channel, as far as the client uses it."""

    def GetSecret(
        self, request: pb.GetSecretRequest, timeout: float | None = ...
    ) -> Awaitable[pb.Secret]: ...

    def GetSecrets(
        self, request: pb.GetSecretsRequest, timeout: float | None = ...
    ) -> Awaitable[pb.GetSecretsResponse]: ...

    def ListSecrets(
        self, request: pb.ListSecretsRequest, timeout: float | None = ...
    ) -> Awaitable[pb.ListSecretsResponse]: ...

    def WhoAmI(
        self, request: pb.WhoAmIRequest, timeout: float | None = ...
    ) -> Awaitable[pb.WhoAmIResponse]: ...

    def WatchSecret(self, request: pb.WatchSecretRequest) -> AsyncWatchCall: ...


class Client:
    """An asyncio connection to the secretd broker. Arguments as for `secretd.Client`
    (without `cache_ttl`); `stub` takes an `AsyncSecretsStub` for tests."""

    def __init__(
        self,
        socket_path: PathLike | None = None,
        timeout: float | None = 5.0,
        *,
        retry: Retry = Retry(),  # noqa: B008 (frozen, immutable)
        stub: AsyncSecretsStub | None = None,
    ) -> None:
        self._socket_path = resolve_socket(socket_path)
        self._timeout = check_timeout(timeout)
        self._retry = retry
        self._pid = os.getpid()
        self._closed = False
        self._channel: grpc.aio.Channel | None = None
        self._stub: AsyncSecretsStub | None = stub

    @property
    def socket_path(self) -> str:
        return self._socket_path

    @property
    def timeout(self) -> float | None:
        return self._timeout

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<secretd.aio.Client socket={self._socket_path!r} timeout={self._timeout}{state}>"

    async def get(self, name: str) -> str:
        """The secret `name` as UTF-8 text."""
        return decode(name, await self.get_bytes(name))

    async def get_bytes(self, name: str) -> bytes:
        """The secret `name` as bytes."""
        check_name(name)
        stub = self._usable()
        request = pb.GetSecretRequest(name=name)
        secret = await self._call(
            "GetSecret", name, lambda: stub.GetSecret(request, timeout=self._timeout)
        )
        return secret.value

    async def get_many(self, names: Iterable[str]) -> dict[str, str]:
        """Several secrets in one call, as text: all of them, or one error for the whole call."""
        wanted = check_names(names)
        stub = self._usable()
        if not wanted:
            return {}
        label = wanted[0] if len(wanted) == 1 else None
        request = pb.GetSecretsRequest(names=wanted)
        response = await self._call(
            "GetSecrets", label, lambda: stub.GetSecrets(request, timeout=self._timeout)
        )
        got = {secret.name: secret.value for secret in response.secrets}
        missing = [name for name in wanted if name not in got]
        if missing:
            raise SecretdError(
                f"secretd: the broker's answer to GetSecrets lacks {missing!r}", code="INTERNAL"
            )
        return {name: decode(name, got[name]) for name in wanted}

    async def list(self) -> builtins.list[str]:
        """Names of the secrets this process may read (never values), sorted."""
        stub = self._usable()
        request = pb.ListSecretsRequest()
        response = await self._call(
            "ListSecrets", None, lambda: stub.ListSecrets(request, timeout=self._timeout)
        )
        return builtins.list(response.names)

    async def whoami(self) -> Identity:
        """What the broker knows about this process: pid, uid, gid, function, scopes."""
        stub = self._usable()
        request = pb.WhoAmIRequest()
        r = await self._call("WhoAmI", None, lambda: stub.WhoAmI(request, timeout=self._timeout))
        return Identity(
            pid=r.pid,
            uid=r.uid,
            gid=r.gid,
            function=r.function or None,
            scopes=tuple(r.scopes),
            exe=r.exe,
        )

    async def watch(self, name: str) -> AsyncGenerator[str, None]:
        """The current value of `name`, then each rotation, as text (see `secretd.Client.watch`)."""
        async for value in self.watch_bytes(name):
            yield decode(name, value)

    async def watch_bytes(self, name: str) -> AsyncGenerator[bytes, None]:
        """Like `watch`, as bytes."""
        check_name(name)
        stub = self._usable()
        request = pb.WatchSecretRequest(name=name)
        last: bytes | None = None
        delays = None
        retried = 0.0
        while True:
            failure: SecretdError | None = None
            first = True
            call = stub.WatchSecret(request)
            try:
                async for secret in call:
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
            stub = self._usable()
            if delays is None:
                delays = self._retry.delays()
            delay = next(delays, None)
            if delay is None:
                raise errors.unavailable(self._socket_path, "the watch stream broke", retried)
            log.debug("secretd: watch of %r interrupted; reconnecting in %.2f s", name, delay)
            await asyncio.sleep(delay)
            retried += delay

    async def close(self) -> None:
        """Close the channel. Further calls raise `SecretdError`."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None and os.getpid() == self._pid:
            await self._channel.close(None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _usable(self) -> AsyncSecretsStub:
        if os.getpid() != self._pid:
            raise fork_error(self._pid)
        if self._closed:
            raise SecretdError("secretd: this client is closed")
        if self._stub is None:
            # Opened here, inside the running loop, rather than in __init__.
            self._channel = grpc.aio.insecure_channel(
                f"unix://{self._socket_path}", options=channel_options()
            )
            self._stub = pb_grpc.SecretsStub(self._channel)  # type: ignore[no-untyped-call]
        assert self._stub is not None
        return self._stub

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

    async def _call(self, rpc: str, name: str | None, fn: Callable[[], Awaitable[T]]) -> T:
        """Await `fn()`, retrying UNAVAILABLE within the retry budget; map any failure."""
        delays: Iterator[float] | None = None  # made on the first failure
        retried = 0.0
        while True:
            try:
                return await fn()
            except grpc.RpcError as err:
                delay = None
                if errors.status_name(err) == "UNAVAILABLE":
                    if delays is None:
                        delays = self._retry.delays()
                    delay = next(delays, None)
                failure = None if delay is not None else self._error(err, rpc, name, retried)
            if failure is not None:
                raise failure  # outside the except block: grpc's error is not chained on
            assert delay is not None
            log.debug("secretd: broker unavailable for %s; retrying in %.2f s", rpc, delay)
            await asyncio.sleep(delay)
            retried += delay
            self._usable()
