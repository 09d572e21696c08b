"""The client against a real `secretd serve` on a temp socket (started by the `broker` fixture)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest
from broker_process import SECRETS, Broker
from unpriv import UnprivPython, unpriv_skip_reason

import secretd
from secretd import Retry
from secretd._proto import secretd_pb2 as pb
from secretd._proto import secretd_pb2_grpc as pb_grpc

DB = SECRETS["APP_DB"]


def run_python(code: str, sock: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter (a fresh default client) with SECRETD_SOCKET set."""
    env = {**os.environ, "SECRETD_SOCKET": sock}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def admin_set(sock: str, name: str, value: bytes) -> None:
    """Admin.SetSecret, or skip when this broker does not have it yet."""
    options = [("grpc.default_authority", "localhost")]
    with grpc.insecure_channel(f"unix://{sock}", options=options) as channel:
        stub = pb_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.SetSecret(pb.SetSecretRequest(name=name, value=value), timeout=10)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                pytest.skip("this broker has no Admin.SetSecret yet")
            raise


def test_get_text_bytes_many_list_whoami(broker: Broker) -> None:
    with secretd.Client(broker.socket) as client:
        assert client.get("APP_DB") == DB
        assert client.get("APP_CACHE") == SECRETS["APP_CACHE"]
        assert client.get_bytes("APP_BINARY") == b"\xff\xfekey"
        assert client.get_many(["APP_PUBLIC", "APP_DB"]) == {
            "APP_PUBLIC": SECRETS["APP_PUBLIC"],
            "APP_DB": DB,
        }
        assert client.list() == sorted(n for n in SECRETS if n.startswith("APP_"))
        me = client.whoami()
        assert (me.pid, me.uid, me.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert me.scopes == ("tests",)
        assert me.function is None


def test_out_of_scope_is_denied_whether_or_not_it_exists(broker: Broker) -> None:
    with secretd.Client(broker.socket) as client:
        with pytest.raises(secretd.PermissionDenied) as exists:
            client.get("OTHER_TOKEN")
        with pytest.raises(secretd.PermissionDenied) as missing:
            client.get("OTHER_NOPE")
        assert str(exists.value).replace("OTHER_TOKEN", "X") == str(missing.value).replace(
            "OTHER_NOPE", "X"
        )
        assert SECRETS["OTHER_TOKEN"] not in repr(exists.value)
        with pytest.raises(secretd.NotFound):
            client.get("APP_NOPE")
        with pytest.raises(secretd.PermissionDenied):
            client.get_many(["APP_DB", "OTHER_TOKEN"])
        with pytest.raises(secretd.SecretdError, match="get_bytes"):
            client.get("APP_BINARY")


def test_module_functions_use_secretd_socket(broker: Broker) -> None:
    code = (
        "import secretd, json; print(json.dumps([secretd.get('APP_DB'), secretd.list(),"
        " secretd.whoami().scopes, secretd.get_many(['APP_PUBLIC']),"
        " next(secretd.watch('APP_PUBLIC'))]))"
    )
    done = run_python(code, broker.socket)
    assert done.returncode == 0, done.stderr
    value, names, scopes, many, watched = json.loads(done.stdout)
    assert watched == SECRETS["APP_PUBLIC"]
    assert value == DB
    assert "APP_DB" in names
    assert scopes == ["tests"]
    assert many == {"APP_PUBLIC": SECRETS["APP_PUBLIC"]}


def test_default_client_works_in_a_forked_child(broker: Broker) -> None:
    """The fork rule: the parent used secretd, the child gets a client of its own."""
    code = """
import os, secretd
assert secretd.get("APP_PUBLIC")
pid = os.fork()
if pid == 0:
    try:
        ok = secretd.get("APP_DB").startswith("postgres://")
        os._exit(0 if ok and secretd.whoami().pid == os.getpid() else 3)
    except BaseException as exc:
        print(type(exc).__name__, exc)
        os._exit(4)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert secretd.get("APP_PUBLIC")
print("ok")
"""
    done = run_python(code, broker.socket)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"


def test_another_uid_is_denied(broker: Broker) -> None:
    reason = unpriv_skip_reason()
    if reason:
        if os.environ.get("CI"):  # under CI a test that cannot run fails, never skips
            pytest.fail(f"{reason} (CI)")
        pytest.skip(reason)
    code = """
import json, secretd
out = {"public": secretd.get("APP_PUBLIC"), "uid": secretd.whoami().uid}
try:
    secretd.get("APP_DB")
except secretd.PermissionDenied as exc:
    out["denied"] = str(exc)
print(json.dumps(out))
"""
    with UnprivPython() as py:
        done = py.run(code, env={"SECRETD_SOCKET": broker.socket})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["uid"] == 65534
    assert out["public"] == SECRETS["APP_PUBLIC"]
    assert "permission denied for secret 'APP_DB' (uid 65534)" in out["denied"]
    assert DB not in done.stdout


def test_asyncio_client(broker: Broker) -> None:
    async def main() -> None:
        async with secretd.aio.Client(broker.socket) as client:
            assert await client.get("APP_DB") == DB
            assert await client.get_bytes("APP_BINARY") == b"\xff\xfekey"
            got = await asyncio.gather(*(client.get("APP_PUBLIC") for _ in range(20)))
            assert got == [SECRETS["APP_PUBLIC"]] * 20
            assert await client.get_many(["APP_DB"]) == {"APP_DB": DB}
            assert "APP_CACHE" in await client.list()
            assert (await client.whoami()).scopes == ("tests",)
            with pytest.raises(secretd.PermissionDenied):
                await client.get("OTHER_TOKEN")
            with pytest.raises(secretd.NotFound):
                await client.get("APP_NOPE")

    asyncio.run(main())


def test_concurrent_gets_from_threads(broker: Broker) -> None:
    errors: list[BaseException] = []
    with secretd.Client(broker.socket) as client:

        def worker() -> None:
            try:
                for _ in range(50):
                    assert client.get("APP_DB") == DB
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []


def test_unavailable_when_no_broker_runs() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "secretd.sock")
        client = secretd.Client(path)  # the default retry: about 2.5 s, then Unavailable
        with pytest.raises(secretd.Unavailable) as info:
            client.get("APP_DB")
        assert "there is no socket file at that path" in str(info.value)
        assert "retried for 2.5 s" in str(info.value)
        # A stale socket file from a dead broker: something is there, nothing accepts.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        with pytest.raises(secretd.Unavailable, match="nothing accepted the connection"):
            secretd.Client(path, retry=Retry(total=0.1)).list()
        client.close()


def test_unavailable_asyncio() -> None:
    async def main() -> None:
        async with secretd.aio.Client("/nonexistent/secretd.sock", retry=Retry(0.1)) as c:
            with pytest.raises(secretd.Unavailable, match="no socket file"):
                await c.get("APP_DB")

    asyncio.run(main())


class _RetryLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retrying = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.retrying.set()


def test_get_succeeds_across_a_broker_restart(fresh_broker: Broker) -> None:
    """SIGKILL the broker; a get issued while it is down succeeds once it is back."""
    client = secretd.Client(fresh_broker.socket, retry=Retry(total=30))
    assert client.get("APP_DB") == DB
    fresh_broker.stop_process(9)
    log = logging.getLogger("secretd")
    handler = _RetryLog()
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)

    def restart() -> None:
        handler.retrying.wait(30)  # the client has seen the broker gone and is retrying
        fresh_broker.start()

    restarter = threading.Thread(target=restart)
    restarter.start()
    try:
        assert client.get("APP_DB") == DB
    finally:
        restarter.join(60)
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
        client.close()
    assert handler.retrying.is_set()


def test_first_get_after_a_restart_succeeds_with_the_default_retry(fresh_broker: Broker) -> None:
    """The channel saw its broker die; once a new one is up, the next get goes through (the
    lowered reconnect backoff lets the default retry reach it)."""
    client = secretd.Client(fresh_broker.socket)
    assert client.get("APP_PUBLIC")
    fresh_broker.stop_process(9)
    with pytest.raises(secretd.Unavailable):
        secretd.Client(fresh_broker.socket, retry=Retry(total=0)).get("APP_PUBLIC")
    fresh_broker.start()
    assert client.get("APP_PUBLIC")
    client.close()


def test_watch_and_cache_follow_a_rotation(fresh_broker: Broker) -> None:
    admin_set(fresh_broker.socket, "APP_ROTATING", b"v1")
    cached = secretd.Client(fresh_broker.socket, cache_ttl=3600)
    with secretd.Client(fresh_broker.socket) as client:
        values = client.watch("APP_ROTATING")
        assert next(values) == "v1"
        assert cached.get("APP_ROTATING") == "v1"
        admin_set(fresh_broker.socket, "APP_ROTATING", b"v2")
        assert next(values) == "v2"
        values.close()
    deadline = time.monotonic() + 30
    while cached.get("APP_ROTATING") != "v2":
        assert time.monotonic() < deadline, "the cache's watch never delivered v2"
        time.sleep(0.01)
    cached.close()


def test_asyncio_watch(fresh_broker: Broker) -> None:
    admin_set(fresh_broker.socket, "APP_ROTATING", b"a1")

    async def main() -> None:
        async with secretd.aio.Client(fresh_broker.socket) as client:
            values = client.watch("APP_ROTATING")
            assert await values.__anext__() == "a1"
            await asyncio.get_running_loop().run_in_executor(
                None, admin_set, fresh_broker.socket, "APP_ROTATING", b"a2"
            )
            assert await values.__anext__() == "a2"
            await values.aclose()

    asyncio.run(main())


def test_health_service_answers_on_the_same_socket(broker: Broker) -> None:
    """The benchmark's baseline call: a raw grpc.health.v1 Check (empty request)."""
    options = [("grpc.default_authority", "localhost")]
    with grpc.insecure_channel(f"unix://{broker.socket}", options=options) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
        )
        assert check(b"", timeout=10) == b"\x08\x01"  # status: SERVING
