"""Who may act as an operator: Admin calls (RegisterWorker, Scan, Status) from a uid outside
`admin_uids` are refused — so no process can register *itself* as a function — and the
function's scope lasts exactly as long as the registration: a descendant that leaves the
worker's process tree, or outlives the worker, no longer counts as the function."""

from __future__ import annotations

import json
import os
import signal

from harness import (
    INTRUDER_UID,
    WORKER_UID,
    Binaries,
    Broker,
    Launcher,
    Sandbox,
    Worker,
    needs_root,
    run_as,
    wait_until,
)

pytestmark = needs_root


def test_an_unprivileged_process_cannot_register_itself_as_a_function(
    broker: Broker, bins: Binaries, sandbox: Sandbox
) -> None:
    public = sandbox.public_bins(bins)
    marker = sandbox.home_for(WORKER_UID) / "ran"
    result = run_as(
        WORKER_UID,
        [
            str(public.shim),
            "--socket",
            str(broker.socket),
            "--function",
            "orders",
            "--",
            "/bin/touch",
            str(marker),
        ],
    )
    assert result.returncode == 125, result.stderr
    assert b"orders" in result.stderr, result.stderr
    assert not marker.exists(), "PROGRAM ran although the registration was refused"


def test_admin_calls_from_a_non_admin_uid_are_refused(
    broker: Broker, bins: Binaries, sandbox: Sandbox
) -> None:
    public = sandbox.public_bins(bins)
    for command in (["scan", "--json"], ["status", "--json"]):
        result = run_as(
            INTRUDER_UID, [str(public.secretd), *command, "--socket", str(broker.socket)]
        )
        assert result.returncode != 0, (command, result.stdout)
        assert b"ermission" in result.stderr, (command, result.stderr)
        assert b'"hits"' not in result.stdout
        assert b'"secrets"' not in result.stdout


def test_a_descendant_that_daemonizes_loses_the_function(
    broker: Broker, launcher: Launcher
) -> None:
    worker = launcher.worker(function="orders")
    orphan = worker.request({"op": "orphan"})
    assert orphan["ok"] is True, orphan
    assert orphan["ppid"] != worker.pid
    assert (orphan["function"], orphan["scopes"], orphan["get"]) == ("", [], "PermissionDenied")
    # The worker itself keeps its function.
    assert worker.whoami()["function"] == "orders"
    worker.exit()


def registered_workers(broker: Broker) -> int:
    result = broker.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["registered_workers"])


def test_a_registration_ends_when_the_worker_exits(broker: Broker, launcher: Launcher) -> None:
    assert registered_workers(broker) == 0
    worker = launcher.worker(function="orders")
    assert worker.whoami()["function"] == "orders"
    assert registered_workers(broker) == 1
    worker.exit()
    wait_until(lambda: registered_workers(broker) == 0, 30, "the registration to end")


def test_a_child_loses_the_function_when_the_registered_worker_dies(
    broker: Broker, launcher: Launcher
) -> None:
    worker = launcher.worker(function="orders")
    worker.send({"op": "handoff"})  # a child takes over the worker's stdin/stdout
    child = Worker(worker.proc, worker.stderr_path)
    assert child.pid != worker.pid
    assert child.whoami()["function"] == "orders"
    assert child.get("ORDERS_DB")["ok"] is True  # its connection is open and attested

    os.kill(worker.pid, signal.SIGKILL)
    worker.proc.wait(timeout=30)
    # Same connection, same live process — but the registration it descended from is gone.
    me = child.whoami()
    assert (me["function"], me["scopes"]) == ("", []), me
    assert child.get("ORDERS_DB")["error"] == "PermissionDenied"
