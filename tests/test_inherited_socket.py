"""7. The grandchild-inherits-socket case is denied.

A registered worker opens a connection, waits until the broker has accepted it, forks, and
exits; its child then speaks gRPC over the inherited connection (see inherit_prog.py). The
control keeps the parent alive and shows the same mechanism does deliver the secret."""

from __future__ import annotations

from harness import (
    WORKER_UID,
    Broker,
    HostSecrets,
    Launcher,
    Sandbox,
    needs_root,
    pid_alive,
)

pytestmark = needs_root


def run_case(launcher: Launcher, sandbox: Sandbox, mode: str) -> dict[str, object]:
    proxy = sandbox.home_for(WORKER_UID) / f"proxy-{mode}.sock"
    channel = launcher.channel(
        "inherit_prog.py", mode, "ORDERS_DB", str(proxy), uid=WORKER_UID, function="orders"
    )
    forked = channel.read()
    assert forked["accepted"] is True, f"broker never accepted the connection: {forked}"
    child = int(str(forked["child"]))
    if mode == "exit":
        channel.proc.wait(timeout=30)  # the connecting process is gone and reaped
        assert pid_alive(child)
    channel.send({"op": "go"})
    result = channel.read()
    assert result["pid"] == child
    return result


def test_control_inherited_connection_works_while_its_owner_lives(
    broker: Broker, launcher: Launcher, sandbox: Sandbox, host_secrets: HostSecrets
) -> None:
    result = run_case(launcher, sandbox, "stay")
    assert result.get("sha256") == host_secrets.sha256("ORDERS_DB"), result


def test_grandchild_holding_a_dead_workers_connection_is_denied(
    broker: Broker, launcher: Launcher, sandbox: Sandbox
) -> None:
    result = run_case(launcher, sandbox, "exit")
    assert result["ok"] is False, result
    assert "sha256" not in result, result
    # Either answer fails closed: a denial, or the broker dropping a connection whose peer died.
    assert result["error"] in ("PermissionDenied", "Unavailable"), result
