"""6. The broker is killed with SIGKILL and restarted on the same socket with the same
environment (as a supervisor would): a long-running registered worker keeps its scope, and its
next get succeeds after the client's bounded retry."""

from __future__ import annotations

import json
import os
import stat

from harness import (
    Broker,
    HostSecrets,
    Launcher,
    needs_root,
    pid_alive,
)

pytestmark = needs_root


def test_registered_worker_survives_a_broker_restart(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    worker = launcher.worker(function="orders")
    child = worker.spawn_child()
    assert worker.get("ORDERS_DB")["sha256"] == host_secrets.sha256("ORDERS_DB")
    old_pid = broker.pid

    broker.kill()
    assert not pid_alive(old_pid)
    # While nothing serves the socket, the client retries for a bounded time, then says so.
    down = worker.get("ORDERS_DB")
    assert down.get("error") == "Unavailable", down
    broker.start()  # same config, socket and environment; the stale socket is replaced
    assert broker.pid != old_pid

    # The same client object, whose connection died with the old broker.
    after = worker.get("ORDERS_DB")
    assert after.get("sha256") == host_secrets.sha256("ORDERS_DB"), (after, broker.log())
    me = worker.whoami()
    assert (me["function"], me["scopes"]) == ("orders", ["orders"]), me
    kid = worker.child({"op": "get", "name": "SHARED_CACHE_URL"})
    assert kid.get("sha256") == host_secrets.sha256("SHARED_CACHE_URL"), kid
    assert pid_alive(child)
    worker.exit()


def test_a_worker_that_exits_while_the_broker_is_down_is_forgotten(
    broker: Broker, launcher: Launcher
) -> None:
    worker = launcher.worker(function="orders")
    assert worker.whoami()["function"] == "orders"
    broker.kill()
    worker.exit()
    broker.start()
    status = broker.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["registered_workers"] == 0, status.stdout


def test_registration_state_is_root_only(broker: Broker, launcher: Launcher) -> None:
    worker = launcher.worker(function="orders")
    assert worker.whoami()["function"] == "orders"
    others = [p for p in broker.socket.parent.iterdir() if p != broker.socket]
    assert others, "no registration state file beside the socket"
    for path in others:
        info = os.lstat(path)
        assert info.st_uid == 0, f"{path} is not root-owned"
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0, f"{path} is readable by others"
    worker.exit()
