"""Unit tests of secretd.Client against a fake stub passed in (no broker, nothing patched)."""

from __future__ import annotations

import os
import pathlib
import threading
import time
from typing import Callable

import grpc
import pytest
from fake_stub import FakeStub

import secretd
from secretd import Client, Retry
from secretd._proto import secretd_pb2 as pb

DSN = b"postgres://orders:hunter2-s3cret@db.internal/orders"
FAST = Retry(total=0.03, initial=0.01)  # delays 0.01, 0.02: three attempts in all


def make(**kw: object) -> tuple[Client, FakeStub]:
    stub = FakeStub({"ORDERS_DB": DSN, "TLS_KEY": b"\xff\x00key", "B": b"bee"}, denied={"OTHER"})
    return Client(socket_path="/tmp/x/secretd.sock", stub=stub, **kw), stub  # type: ignore[arg-type]


def no_value_in(exc: BaseException) -> None:
    """The exception, its repr and everything chained to it carry no secret value."""
    seen: BaseException | None = exc
    while seen is not None:
        for text in (str(seen), repr(seen), repr(seen.args)):
            assert "hunter2" not in text
            assert "key" not in text.replace("TLS_KEY", "")
        seen = seen.__cause__ or seen.__context__


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# -- the calls ---------------------------------------------------------------------------


def test_get_returns_text_and_get_bytes_returns_bytes() -> None:
    client, stub = make()
    assert client.get("ORDERS_DB") == DSN.decode()
    assert client.get_bytes("TLS_KEY") == b"\xff\x00key"
    assert [r.name for _, r in stub.calls] == ["ORDERS_DB", "TLS_KEY"]


def test_get_many_keeps_order_drops_duplicates_in_one_call() -> None:
    client, stub = make()
    assert list(client.get_many(["B", "ORDERS_DB", "B"]).items()) == [
        ("B", "bee"),
        ("ORDERS_DB", DSN.decode()),
    ]
    assert stub.count("GetSecrets") == 1
    assert list(stub.calls[0][1].names) == ["B", "ORDERS_DB"]


def test_get_many_of_nothing_makes_no_call() -> None:
    client, stub = make()
    assert client.get_many([]) == {}
    assert stub.calls == []


def test_get_many_refuses_a_single_string() -> None:
    client, _ = make()
    with pytest.raises(TypeError, match="list of names"):
        client.get_many("ORDERS_DB")


def test_get_many_fails_whole_call_when_one_name_fails() -> None:
    client, _ = make()
    with pytest.raises(secretd.PermissionDenied):
        client.get_many(["ORDERS_DB", "OTHER"])


def test_list_and_whoami() -> None:
    client, _ = make()
    assert client.list() == ["B", "ORDERS_DB", "TLS_KEY"]
    me = client.whoami()
    assert me == secretd.Identity(
        pid=42, uid=1001, gid=1001, function=None, scopes=("orders",), exe="/usr/bin/py"
    )
    with pytest.raises(AttributeError):
        me.uid = 0  # type: ignore[misc]


def test_timeout_is_passed_to_every_call() -> None:
    client, stub = make(timeout=1.5)
    client.get("B")
    client.list()
    client.whoami()
    assert stub.timeouts == [1.5, 1.5, 1.5]


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_bad_timeout_is_rejected(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        Client(socket_path="/x.sock", timeout=timeout, stub=FakeStub())


# -- error mapping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "exc_type"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, secretd.PermissionDenied),
        (grpc.StatusCode.NOT_FOUND, secretd.NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, secretd.InvalidName),
        (grpc.StatusCode.DEADLINE_EXCEEDED, secretd.Unavailable),
        (grpc.StatusCode.UNIMPLEMENTED, secretd.SecretdError),
        (grpc.StatusCode.INTERNAL, secretd.SecretdError),
        (grpc.StatusCode.UNAUTHENTICATED, secretd.SecretdError),
    ],
)
def test_status_codes_map_to_exceptions_without_retry(
    code: grpc.StatusCode, exc_type: type[secretd.SecretdError]
) -> None:
    client, stub = make(retry=FAST)
    stub.fail.append(code)
    with pytest.raises(secretd.SecretdError) as info:
        client.get("ORDERS_DB")
    assert type(info.value) is exc_type
    assert info.value.code == code.name
    assert info.value.name == "ORDERS_DB"
    assert stub.count("GetSecret") == 1, "only UNAVAILABLE is retried"
    assert info.value.__cause__ is None
    assert info.value.__context__ is None, "grpc's error is not chained on"
    no_value_in(info.value)


def test_messages_say_what_to_do() -> None:
    client, stub = make(retry=FAST)
    with pytest.raises(secretd.PermissionDenied) as denied:
        client.get("OTHER")
    assert "'OTHER'" in str(denied.value)
    assert "whoami()" in str(denied.value)
    assert f"uid {os.getuid()}" in str(denied.value)
    with pytest.raises(secretd.NotFound) as missing:
        client.get("NOPE")
    assert "secretd.list()" in str(missing.value)
    stub.fail.extend([grpc.StatusCode.UNAVAILABLE] * 3)
    with pytest.raises(secretd.Unavailable) as down:
        client.get("B")
    assert "/tmp/x/secretd.sock" in str(down.value)
    assert "SECRETD_SOCKET" in str(down.value)
    assert "no socket file" in str(down.value)


def test_callers_catch_everything_through_the_base_class() -> None:
    for exc_type in (
        secretd.PermissionDenied,
        secretd.NotFound,
        secretd.InvalidName,
        secretd.Unavailable,
    ):
        assert issubclass(exc_type, secretd.SecretdError)
    assert issubclass(secretd.InvalidName, ValueError)


# -- retries -----------------------------------------------------------------------------


def test_unavailable_is_retried_until_the_broker_answers() -> None:
    client, stub = make()
    stub.fail.extend([grpc.StatusCode.UNAVAILABLE] * 3)
    assert client.get("B") == "bee"
    assert stub.count("GetSecret") == 4


def test_unavailable_is_raised_when_the_retry_budget_runs_out() -> None:
    client, stub = make(retry=FAST)
    stub.fail.extend([grpc.StatusCode.UNAVAILABLE] * 10)
    with pytest.raises(secretd.Unavailable) as info:
        client.list()
    assert stub.count("ListSecrets") == 3
    assert "retried for 0.0 s" in str(info.value)
    assert info.value.__context__ is None


def test_retry_zero_means_one_attempt() -> None:
    client, stub = make(retry=Retry(total=0))
    stub.fail.append(grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(secretd.Unavailable):
        client.whoami()
    assert stub.count("WhoAmI") == 1


def test_default_retry_schedule_is_bounded_and_outlasts_a_restart() -> None:
    delays = list(Retry().delays())
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.25]
    assert sum(delays) == pytest.approx(2.5)
    assert list(Retry(total=0).delays()) == []
    with pytest.raises(ValueError, match="Retry needs"):
        Retry(initial=0)


# -- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "/abs", "a//b", "a/", "a/../b", "..", "a b", "x" * 257, "naïve", "postgres://u:hunter2@h"],
)
def test_invalid_names_are_refused_locally_without_echoing_them(name: str) -> None:
    client, stub = make()
    for call in (client.get, client.get_bytes, lambda n: client.get_many([n])):
        with pytest.raises(secretd.InvalidName) as info:
            call(name)
        assert "1-256 characters" in str(info.value)
        if len(name) > 3:
            assert name not in str(info.value)
        no_value_in(info.value)
    assert stub.calls == []


@pytest.mark.parametrize("name", ["A", "orders/db.url", "x-y_z.1", "a/b/c", "x" * 256, "a..b"])
def test_valid_names_reach_the_broker(name: str) -> None:
    client, stub = make()
    with pytest.raises(secretd.NotFound):
        client.get(name)
    assert stub.count("GetSecret") == 1


def test_a_name_must_be_a_string() -> None:
    client, _ = make()
    with pytest.raises(TypeError, match="must be str"):
        client.get(b"ORDERS_DB")  # type: ignore[arg-type]


# -- values never leak -------------------------------------------------------------------


def test_non_utf8_value_error_carries_no_bytes() -> None:
    client, _ = make()
    with pytest.raises(secretd.SecretdError, match="get_bytes") as info:
        client.get("TLS_KEY")
    assert info.value.__context__ is None, "UnicodeDecodeError.object would hold the value"
    no_value_in(info.value)


def test_client_repr_shows_no_value() -> None:
    client, _ = make(cache_ttl=30)
    client.get("ORDERS_DB")
    assert "hunter2" not in repr(client)
    assert repr(client).startswith("<secretd.Client socket='/tmp/x/secretd.sock'")
    client.close()


# -- socket resolution -------------------------------------------------------------------


def test_socket_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRETD_SOCKET", "/env/secretd.sock")
    assert Client("/arg/secretd.sock", stub=FakeStub()).socket_path == "/arg/secretd.sock"
    assert Client(pathlib.Path("/p/s.sock"), stub=FakeStub()).socket_path == "/p/s.sock"


def test_environment_wins_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRETD_SOCKET", "/env/secretd.sock")
    assert Client(stub=FakeStub()).socket_path == "/env/secretd.sock"


@pytest.mark.parametrize("value", [None, ""])
def test_default_socket(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("SECRETD_SOCKET", raising=False)
    else:
        monkeypatch.setenv("SECRETD_SOCKET", value)
    assert Client(stub=FakeStub()).socket_path == "/run/secretd/secretd.sock"
    assert secretd.DEFAULT_SOCKET == "/run/secretd/secretd.sock"


def test_relative_socket_is_made_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/tmp")
    assert Client("s.sock", stub=FakeStub()).socket_path == "/tmp/s.sock"


# -- lifecycle, threads, fork ------------------------------------------------------------


def test_context_manager_closes_and_closed_client_refuses() -> None:
    client, _ = make()
    with client as c:
        assert c.get("B") == "bee"
    with pytest.raises(secretd.SecretdError, match="closed"):
        client.get("B")
    client.close()  # idempotent


def test_concurrent_gets_from_many_threads() -> None:
    lock = threading.Lock()
    for cache_ttl in (None, 60.0):
        client, _ = make(cache_ttl=cache_ttl)
        results: list[str] = []

        def worker(client: Client = client, results: list[str] = results) -> None:
            for _ in range(200):
                value = client.get("ORDERS_DB")
                with lock:
                    results.append(value)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [DSN.decode()] * 1600
        client.close()


def test_client_from_parent_refuses_to_work_after_fork() -> None:
    client, _ = make()
    assert client.get("B") == "bee"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            client.get("B")
            os.write(write_end, b"no error")
        except secretd.SecretdError as exc:
            os.write(write_end, str(exc).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "after fork()" in message
    assert "Create clients after forking" in message
    assert client.get("B") == "bee", "the parent's client still works"


# -- cache_ttl ---------------------------------------------------------------------------


def test_cache_serves_repeat_gets_and_a_watch_keeps_it_fresh() -> None:
    client, stub = make(cache_ttl=3600)
    assert client.get("B") == "bee"
    watch = stub.wait_watches(1)
    assert client.get("B") == "bee"
    assert stub.count("GetSecret") == 1
    watch.push(stub.set("B", b"rotated"))
    wait_until(lambda: client.get("B") == "rotated", "the watch to update the cache")
    assert stub.count("GetSecret") == 1
    client.close()
    assert watch.cancelled.is_set(), "close() stops the cache's watches"


def test_cache_drops_a_value_whose_scope_is_revoked() -> None:
    client, stub = make(cache_ttl=3600)
    assert client.get("B") == "bee"
    watch = stub.wait_watches(1)
    stub.denied.add("B")
    watch.push(grpc.StatusCode.PERMISSION_DENIED)
    wait_until(lambda: stub.count("GetSecret") > 1 or _denied(client), "eviction")
    with pytest.raises(secretd.PermissionDenied):
        client.get("B")
    client.close()


def _denied(client: Client) -> bool:
    try:
        client.get("B")
    except secretd.PermissionDenied:
        return True
    return False


def test_cache_without_a_watch_expires_after_ttl() -> None:
    client, stub = make(cache_ttl=0.05)
    assert client.get("B") == "bee"
    stub.wait_watches(1).push(grpc.StatusCode.UNIMPLEMENTED)  # an older broker
    wait_until(lambda: stub.count("GetSecret") == 1 and _expired(client, stub), "expiry")
    client.close()


def _expired(client: Client, stub: FakeStub) -> bool:
    client.get("B")
    return stub.count("GetSecret") >= 2


def test_no_cache_by_default() -> None:
    client, stub = make()
    client.get("B")
    client.get("B")
    assert stub.count("GetSecret") == 2
    assert stub.count("WatchSecret") == 0


# -- watch -------------------------------------------------------------------------------


def test_watch_yields_current_value_then_rotations_and_survives_a_restart() -> None:
    client, stub = make(retry=FAST)
    first = stub.set("B", b"v1")
    values = client.watch("B")
    stream = None

    def feed() -> None:
        nonlocal stream
        stream = stub.wait_watches(1)
        stream.push(first)
        stream.push(stub.set("B", b"v2"))
        stream.push(grpc.StatusCode.UNAVAILABLE)  # broker restarts
        again = stub.wait_watches(2)
        again.push(pb_secret("B", b"v2", 2))  # current value, re-sent: skipped
        again.push(stub.set("B", b"v3"))
        again.push(grpc.StatusCode.NOT_FOUND)  # deleted

    feeder = threading.Thread(target=feed)
    feeder.start()
    got: list[str] = []
    with pytest.raises(secretd.NotFound):
        got.extend(values)
    feeder.join(10)
    assert got == ["v1", "v2", "v3"]


def test_leaving_a_watch_loop_cancels_the_stream() -> None:
    client, stub = make()
    values = client.watch("B")
    feeder = threading.Thread(target=lambda: stub.wait_watches(1).push(stub.set("B", b"v1")))
    feeder.start()
    assert next(values) == "v1"
    values.close()
    feeder.join(10)
    assert stub.watches[0].cancelled.is_set()


def test_watch_gives_up_when_the_broker_stays_away() -> None:
    client, stub = make(retry=FAST)
    values = client.watch("B")

    def feed() -> None:
        for n in (1, 2, 3):
            stub.wait_watches(n).push(grpc.StatusCode.UNAVAILABLE)

    feeder = threading.Thread(target=feed)
    feeder.start()
    with pytest.raises(secretd.Unavailable, match="watch stream broke"):
        next(values)
    feeder.join(10)
    assert len(stub.watches) == 3


def pb_secret(name: str, value: bytes, version: int) -> pb.Secret:
    return pb.Secret(name=name, value=value, version=version)
