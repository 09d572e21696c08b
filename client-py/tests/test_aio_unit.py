"""Unit tests of secretd.aio.Client against a fake grpc.aio-shaped stub (no broker)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fake_stub import AsyncFakeStub, FakeStub

import secretd
from secretd import Retry
from secretd._proto import secretd_pb2 as pb

FAST = Retry(total=0.03, initial=0.01)


def make(**kw: object) -> tuple[secretd.aio.Client, FakeStub, AsyncFakeStub]:
    sync = FakeStub({"ORDERS_DB": b"postgres://u:hunter2@h/db", "B": b"bee"}, denied={"OTHER"})
    stub = AsyncFakeStub(sync)
    client = secretd.aio.Client("/tmp/x/secretd.sock", stub=stub, **kw)  # type: ignore[arg-type]
    return client, sync, stub


def test_same_surface_as_the_sync_client() -> None:
    async def main() -> None:
        client, sync, _ = make(timeout=2.0)
        async with client as c:
            assert await c.get("ORDERS_DB") == "postgres://u:hunter2@h/db"
            assert await c.get_bytes("B") == b"bee"
            assert await c.get_many(["B", "ORDERS_DB"]) == {
                "B": "bee",
                "ORDERS_DB": "postgres://u:hunter2@h/db",
            }
            assert await c.list() == ["B", "ORDERS_DB"]
            assert (await c.whoami()).scopes == ("orders",)
        assert set(sync.timeouts) == {2.0}
        with pytest.raises(secretd.SecretdError, match="closed"):
            await client.get("B")

    asyncio.run(main())


@pytest.mark.parametrize(
    ("code", "exc_type"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, secretd.PermissionDenied),
        (grpc.StatusCode.NOT_FOUND, secretd.NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, secretd.InvalidName),
        (grpc.StatusCode.DEADLINE_EXCEEDED, secretd.Unavailable),
        (grpc.StatusCode.INTERNAL, secretd.SecretdError),
    ],
)
def test_errors_map_like_the_sync_client(
    code: grpc.StatusCode, exc_type: type[secretd.SecretdError]
) -> None:
    async def main() -> None:
        client, sync, _ = make(retry=FAST)
        sync.fail.append(code)
        with pytest.raises(secretd.SecretdError) as info:
            await client.get("ORDERS_DB")
        assert type(info.value) is exc_type
        assert info.value.__context__ is None
        assert "hunter2" not in str(info.value)
        assert sync.count("GetSecret") == 1

    asyncio.run(main())


def test_unavailable_is_retried_then_raised() -> None:
    async def main() -> None:
        client, sync, _ = make(retry=FAST)
        sync.fail.extend([grpc.StatusCode.UNAVAILABLE] * 2)
        assert await client.get("B") == "bee"
        assert sync.count("GetSecret") == 3
        sync.fail.extend([grpc.StatusCode.UNAVAILABLE] * 5)
        with pytest.raises(secretd.Unavailable):
            await client.list()
        assert sync.count("ListSecrets") == 3

    asyncio.run(main())


def test_watch_yields_values_reconnects_and_ends_on_revocation() -> None:
    async def main() -> None:
        client, _, stub = make(retry=FAST)
        v = [pb.Secret(name="B", value=x, version=i) for i, x in enumerate([b"1", b"2", b"3"])]
        stub.watch_scripts.append([v[0], v[1], grpc.StatusCode.UNAVAILABLE])
        stub.watch_scripts.append([v[1], v[2], grpc.StatusCode.PERMISSION_DENIED])
        got: list[str] = []

        async def follow() -> None:
            async for value in client.watch("B"):
                got.append(value)

        with pytest.raises(secretd.PermissionDenied):
            await follow()
        assert got == ["1", "2", "3"]

    asyncio.run(main())


def test_invalid_name_is_refused_before_any_call() -> None:
    async def main() -> None:
        client, sync, _ = make()
        with pytest.raises(secretd.InvalidName):
            await client.get("../etc/passwd")
        assert sync.calls == []

    asyncio.run(main())


def test_client_can_be_created_outside_an_event_loop() -> None:
    client = secretd.aio.Client("/tmp/none/secretd.sock", retry=Retry(total=0))
    assert "secretd.aio.Client" in repr(client)

    async def main() -> None:
        with pytest.raises(secretd.Unavailable, match="no socket file"):
            await client.get("B")
        await client.close()

    asyncio.run(main())
