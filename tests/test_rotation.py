"""Contract §6, end to end: an operator rotates a secret with `secretd set` (value on stdin,
never argv) or removes it with `secretd delete`; a watching worker sees each new version, then
NOT_FOUND. Secrets from `[sources.files]` are read at start-up and followed when the file is
rewritten in place or swapped the way Kubernetes updates a secret volume (`..data` symlink)."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
from pathlib import Path

from harness import (
    Broker,
    BrokerFactory,
    HostSecrets,
    Launcher,
    Sandbox,
    Scope,
    count_in_memory,
    leaked_values,
    needs_root,
    wait_until,
)

pytestmark = needs_root


def sha(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


def admin_set(broker: Broker, name: str, value: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(broker.bins.secretd), "set", name, "--socket", str(broker.socket)],
        input=value,
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_set_and_delete_reach_a_watching_worker(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    worker = launcher.worker()
    assert worker.request({"op": "watch", "name": "ORDERS_DB"})["ok"] is True
    first = worker.request({"op": "watch_next", "name": "ORDERS_DB"})
    assert first.get("sha256") == host_secrets.sha256("ORDERS_DB"), first

    rotated = f"postgresql://orders:{secrets.token_hex(16)}@db2.internal/orders".encode()
    result = admin_set(broker, "ORDERS_DB", rotated)
    assert result.returncode == 0, result.stderr
    assert leaked_values(result.stdout + result.stderr, [rotated]) == []
    event = worker.request({"op": "watch_next", "name": "ORDERS_DB"})
    assert event.get("sha256") == sha(rotated), event
    assert worker.get("ORDERS_DB")["sha256"] == sha(rotated)

    result = subprocess.run(
        [str(broker.bins.secretd), "delete", "ORDERS_DB", "--socket", str(broker.socket)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    ended = worker.request({"op": "watch_next", "name": "ORDERS_DB"})
    assert ended.get("error") == "NotFound", ended
    assert worker.get("ORDERS_DB")["error"] == "NotFound"

    everything = [*host_secrets.all_values(), rotated]
    assert leaked_values(broker.audit_bytes() + broker.log().encode(), everything) == []
    worker.exit()


def test_rotated_values_leave_the_broker_while_the_function_stays_connected(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    """A function holds one client for its life: a watch and plain reads on one connection.
    After each rotation the old value must be gone from the broker's memory (issue: the
    stream's encode buffer and the connection's HTTP/2 write buffer outlive a message)."""
    worker = launcher.worker()
    assert worker.request({"op": "watch", "name": "ORDERS_DB"})["ok"] is True
    assert worker.request({"op": "watch_next", "name": "ORDERS_DB"})["ok"] is True
    old = {"original": host_secrets.values["ORDERS_DB"].encode()}
    current = old["original"]
    for i, size in enumerate((40, 700, 3000, 120)):
        rotated = f"postgresql://orders:{secrets.token_hex(16)}@db/{'x' * size}".encode()
        assert admin_set(broker, "ORDERS_DB", rotated).returncode == 0
        assert worker.request({"op": "watch_next", "name": "ORDERS_DB"})["sha256"] == sha(rotated)
        assert worker.get("ORDERS_DB")["sha256"] == sha(rotated)
        old[f"rotation {i}"] = current
        current = rotated

    # The worker is still connected, its watch open.
    def lingering() -> dict[str, int]:
        found = count_in_memory(broker.pid, old)
        return {name: n for name, n in found.items() if n}

    wait_until(lambda: not lingering(), 30, "no copy of a rotated-away value in the broker")
    assert count_in_memory(broker.pid, {"current": current})["current"] >= 1
    worker.exit()


def write_k8s_volume(volume: Path, files: dict[str, bytes], generation: int) -> None:
    """What the kubelet does: a new timestamped dir, then an atomic swap of the ..data link."""
    data = volume / f"..{generation}"
    data.mkdir(mode=0o700)
    for name, value in files.items():
        (data / name).write_bytes(value)
    tmp = volume / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, volume / "..data")
    for name in files:
        link = volume / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)


def start_with_file_sources(
    make_broker: BrokerFactory, sandbox: Sandbox
) -> tuple[Broker, Path, Path, bytes, bytes]:
    plain = sandbox.root / "secrets"
    plain.mkdir(mode=0o700)
    volume = sandbox.root / "k8s-volume"
    volume.mkdir(mode=0o700)
    cert = f"-----CERT {secrets.token_hex(16)}-----".encode()
    (plain / "ORDERS_CERT").write_bytes(cert)
    key = f"k8s-{secrets.token_hex(16)}".encode()
    write_k8s_volume(volume, {"ORDERS_K8S_KEY": key}, 1)
    scopes = [Scope("orders", ["ORDERS_*"], {"function": "orders"})]
    broker = make_broker(scopes, files_dirs=[plain, volume])
    return broker, plain, volume, cert, key


def rewrite_both(plain: Path, volume: Path) -> tuple[bytes, bytes]:
    new_cert = f"-----CERT {secrets.token_hex(16)}-----".encode()
    (plain / "ORDERS_CERT").write_bytes(new_cert)  # in place
    new_key = f"k8s-{secrets.token_hex(16)}".encode()
    write_k8s_volume(volume, {"ORDERS_K8S_KEY": new_key}, 2)  # kubelet-style swap
    return new_cert, new_key


def test_file_secrets_are_read_and_refreshed_into_watches(
    make_broker: BrokerFactory, launcher: Launcher, sandbox: Sandbox
) -> None:
    broker, plain, volume, cert, key = start_with_file_sources(make_broker, sandbox)
    worker = launcher.worker()
    assert worker.get("ORDERS_CERT").get("sha256") == sha(cert)
    assert worker.get("ORDERS_K8S_KEY").get("sha256") == sha(key)
    names = worker.list()["names"]
    assert {"ORDERS_CERT", "ORDERS_K8S_KEY"} <= set(names), names
    assert not [n for n in names if n.startswith(".")], names  # no ..data, no ..1

    for name in ("ORDERS_CERT", "ORDERS_K8S_KEY"):
        worker.request({"op": "watch", "name": name})
        worker.request({"op": "watch_next", "name": name})
    new_cert, new_key = rewrite_both(plain, volume)
    result = broker.cli("refresh")  # Admin.Refresh: re-read every source now
    assert result.returncode == 0, result.stderr
    for name, value in (("ORDERS_CERT", new_cert), ("ORDERS_K8S_KEY", new_key)):
        event = worker.request({"op": "watch_next", "name": name})
        assert event.get("sha256") == sha(value), (name, event)
    worker.exit()


def test_file_secrets_are_followed_without_a_refresh(
    make_broker: BrokerFactory, launcher: Launcher, sandbox: Sandbox
) -> None:
    _broker, plain, volume, _cert, _key = start_with_file_sources(make_broker, sandbox)
    worker = launcher.worker()
    for name in ("ORDERS_CERT", "ORDERS_K8S_KEY"):
        worker.request({"op": "watch", "name": name})
        worker.request({"op": "watch_next", "name": name})
    new_cert, new_key = rewrite_both(plain, volume)
    for name, value in (("ORDERS_CERT", new_cert), ("ORDERS_K8S_KEY", new_key)):
        event = worker.request({"op": "watch_next", "name": name, "timeout": 10.0})
        assert event.get("sha256") == sha(value), (name, event)
    worker.exit()
