"""Who may act as an operator: Admin calls (RegisterWorker, Scan, Status) from a uid outside
`admin_uids` are refused — so no process can register *itself* as a function — and a descendant
that leaves the registered worker's process tree (daemonizes) no longer counts as the function."""

from __future__ import annotations

import json

from harness import (
    INTRUDER_UID,
    WORKER_UID,
    Binaries,
    Broker,
    Launcher,
    Sandbox,
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
