"""What the shim guarantees about the process it execs (contract §4), read from /proc:
credentials fully switched with no supplementary groups and no capabilities, no_new_privs set,
inherited descriptors above 2 closed, the signal mask reset."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from harness import (
    WORKER_UID,
    Broker,
    HostSecrets,
    Launcher,
    Sandbox,
    needs_root,
)

pytestmark = needs_root


def status_of(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def block_signals() -> None:
    # What a careless host might do before it starts the shim.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})


def test_worker_credentials_privileges_fds_and_signal_mask(
    broker: Broker, launcher: Launcher, sandbox: Sandbox, host_secrets: HostSecrets
) -> None:
    leaked_file = sandbox.root / "host-secret.txt"
    leaked_file.write_text(host_secrets.values["ORDERS_DB"])
    leaked_file.chmod(0o600)
    fd = os.open(leaked_file, os.O_RDONLY)  # inheritable once passed: not CLOEXEC in the shim
    try:
        worker = launcher.worker(pass_fds=(fd,), preexec_fn=block_signals)
    finally:
        os.close(fd)

    status = status_of(worker.pid)
    uid = str(WORKER_UID)
    assert status["Uid"].split() == [uid] * 4, status["Uid"]
    assert status["Gid"].split() == [uid] * 4, status["Gid"]
    assert status["Groups"] == "", status["Groups"]
    assert status["NoNewPrivs"] == "1"
    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert int(status["SigBlk"], 16) == 0, f"signal mask not reset: {status['SigBlk']}"

    fds = worker.request({"op": "fds"})["fds"]
    assert str(leaked_file) not in fds.values(), fds
    assert {"0", "1", "2"} <= set(fds), fds
    worker.exit()


def test_keep_and_set_are_the_only_additions(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    worker = launcher.worker(
        shim_args=[
            "--keep",
            "LANG",
            "--keep",
            "PATH",
            "--keep",
            "NOT_IN_THE_HOST_ENV",
            "--set",
            "APP_MODE=production",
        ]
    )
    entries = dict(
        item.decode().split("=", 1)
        for item in Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
        if item
    )
    assert sorted(entries) == ["APP_MODE", "LANG", "PATH", "SECRETD_SOCKET"], entries
    assert entries["APP_MODE"] == "production"
    assert entries["LANG"] == launcher.host_env["LANG"]
    assert (
        entries["PATH"] == launcher.host_env["PATH"]
    )  # --keep PATH: the host's, not the fixed one
    assert entries["SECRETD_SOCKET"] == str(broker.socket)
    worker.exit()
