"""2. The shim launches a Python worker as an unprivileged uid with --function: its environ and
cmdline, and those of a child it spawns, hold no value; it gets its connection string through
the client and nothing outside its scope.

And from the shim issue: registration via `secretd-shim --function` gives the worker AND its
child the function's scope, while the same uid unregistered is denied; a uid-only scope is
shown for comparison."""

from __future__ import annotations

from harness import (
    BILLING_UID,
    WORKER_UID,
    Broker,
    HostSecrets,
    Launcher,
    Worker,
    cmdline_of,
    environ_names,
    environ_of,
    leaked_values,
    needs_root,
    proc_uid,
)

pytestmark = needs_root

ORDERS_SCOPE = ["ORDERS_API_TOKEN", "ORDERS_DB", "SHARED_CACHE_URL"]


def assert_clean_process(
    pid: int, broker: Broker, host_secrets: HostSecrets, *, python_child: bool = False
) -> None:
    environ = environ_of(pid)
    cmdline = cmdline_of(pid)
    assert proc_uid(pid) == WORKER_UID
    expected = ["PATH", "SECRETD_SOCKET"]
    if python_child and b"LC_CTYPE=C.UTF-8" in environ.split(b"\0"):
        # The worker's interpreter coerced the C locale (PEP 538) and exported LC_CTYPE to the
        # children it starts: Python's doing, not the shim's, and no secret.
        expected = ["LC_CTYPE", *expected]
    assert environ_names(environ) == expected, environ_names(environ)
    assert f"SECRETD_SOCKET={broker.socket}".encode() in environ.split(b"\0")
    everything = [*host_secrets.all_values(), broker.env["UNBROKERED_TOKEN"].encode()]
    assert leaked_values(environ, everything) == [], f"pid {pid} has a value in its environ"
    assert leaked_values(cmdline, everything) == [], f"pid {pid} has a value in its cmdline"


def assert_got(reply: dict[str, object], host_secrets: HostSecrets, name: str) -> None:
    assert reply.get("ok") is True, reply
    assert reply["sha256"] == host_secrets.sha256(name), f"{name}: wrong value delivered"


def test_worker_and_child_hold_no_value_in_environ_or_cmdline(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    # The shim's own environment holds every secret (a host-like parent): none may pass.
    worker = launcher.worker()
    child = worker.spawn_child()
    assert_got(worker.get("ORDERS_DB"), host_secrets, "ORDERS_DB")
    assert_got(worker.child({"op": "get", "name": "ORDERS_DB"}), host_secrets, "ORDERS_DB")

    # Checked after both fetched the value: it is in their memory, never in /proc.
    assert_clean_process(worker.pid, broker, host_secrets)
    assert_clean_process(child, broker, host_secrets, python_child=True)
    worker.exit()


def test_worker_gets_its_scope_and_nothing_else(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    worker = launcher.worker()
    for name in ORDERS_SCOPE:
        assert_got(worker.get(name), host_secrets, name)
    assert_got(worker.request({"op": "get_str", "name": "ORDERS_DB"}), host_secrets, "ORDERS_DB")
    assert worker.list() == {"ok": True, "names": ORDERS_SCOPE}

    denied = worker.get("BILLING_KEY")
    assert denied["error"] == "PermissionDenied", denied
    # Out of scope and absent looks exactly like out of scope and present, on the wire and in
    # the client's exception (which names the secret asked for).
    absent = worker.get("BILLING_NOPE")
    assert absent["error"] == "PermissionDenied", absent
    assert absent["message"].replace("BILLING_NOPE", "BILLING_KEY") == denied["message"]
    raw_denied = worker.request({"op": "raw_get", "name": "BILLING_KEY"})
    raw_absent = worker.request({"op": "raw_get", "name": "BILLING_NOPE"})
    assert raw_denied["code"] == raw_absent["code"] == "PERMISSION_DENIED"
    assert raw_absent["details"].replace("BILLING_NOPE", "BILLING_KEY") == raw_denied["details"]
    # In scope but absent is NOT_FOUND; a malformed name is INVALID_ARGUMENT.
    assert worker.get("ORDERS_MISSING")["error"] == "NotFound"
    assert worker.get("../ORDERS_DB")["error"] == "InvalidName"
    # The broker refuses it too when a client sends it anyway.
    assert worker.request({"op": "raw_get", "name": "../ORDERS_DB"})["code"] == "INVALID_ARGUMENT"
    # All or nothing: one out-of-scope name fails the whole call.
    assert worker.get_many(["ORDERS_DB", "BILLING_KEY"])["error"] == "PermissionDenied"
    many = worker.get_many(["ORDERS_DB", "SHARED_CACHE_URL"])
    assert many["ok"] is True, many
    assert many["values"]["ORDERS_DB"]["sha256"] == host_secrets.sha256("ORDERS_DB")
    worker.exit()


def whoami(target: Worker, via_child: bool = False) -> dict[str, object]:
    reply = target.child({"op": "whoami"}) if via_child else target.whoami()
    assert reply.get("ok") is True, reply
    return reply


def test_function_registration_covers_the_worker_and_its_child(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    worker = launcher.worker(function="orders")
    child = worker.spawn_child()

    me = whoami(worker)
    assert (me["pid"], me["uid"], me["function"], me["scopes"]) == (
        worker.pid,
        WORKER_UID,
        "orders",
        ["orders"],
    )
    assert me["exe"] == str(launcher.staged.python.resolve()), me  # /proc/<pid>/exe, as read
    kid = whoami(worker, via_child=True)
    assert (kid["pid"], kid["uid"], kid["function"], kid["scopes"]) == (
        child,
        WORKER_UID,
        "orders",
        ["orders"],
    )
    assert_got(
        worker.child({"op": "get", "name": "SHARED_CACHE_URL"}), host_secrets, "SHARED_CACHE_URL"
    )
    worker.exit()


def test_same_uid_unregistered_is_denied(broker: Broker, launcher: Launcher) -> None:
    worker = launcher.worker(function=None)  # same uid as the registered worker
    worker.spawn_child()
    me = whoami(worker)
    assert (me["uid"], me["function"], me["scopes"]) == (WORKER_UID, "", [])
    assert worker.get("ORDERS_DB")["error"] == "PermissionDenied"
    assert worker.child({"op": "get", "name": "ORDERS_DB"})["error"] == "PermissionDenied"
    assert worker.list() == {"ok": True, "names": []}
    worker.exit()


def test_uid_scope_for_comparison(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    worker = launcher.worker(uid=BILLING_UID, function=None)
    worker.spawn_child()
    me = whoami(worker)
    assert (me["uid"], me["function"], me["scopes"]) == (BILLING_UID, "", ["billing"])
    assert_got(worker.get("BILLING_KEY"), host_secrets, "BILLING_KEY")
    assert_got(worker.child({"op": "get", "name": "BILLING_KEY"}), host_secrets, "BILLING_KEY")
    assert worker.get("ORDERS_DB")["error"] == "PermissionDenied"
    worker.exit()


def test_malformed_and_oversized_names_are_refused_and_the_broker_keeps_serving(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    worker = launcher.worker()
    for name in ("/ORDERS_DB", "ORDERS_DB/", "ORDERS_*", "ORDERS_DB\x00", "A" * 257):
        reply = worker.request({"op": "raw_get", "name": name})
        assert reply["code"] == "INVALID_ARGUMENT", (name[:20], reply)
    for size in (70_000, 4_000_000):  # beyond the broker's request limit
        reply = worker.request({"op": "raw_get", "name": "A" * size})
        assert reply["ok"] is False, size
        assert reply["code"] in ("INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED"), reply
    assert_got(worker.get("ORDERS_DB"), host_secrets, "ORDERS_DB")
    worker.exit()
