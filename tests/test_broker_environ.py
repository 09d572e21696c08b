"""1. A host-like parent with secrets in its environment starts the broker; the broker's
/proc/<pid>/environ and cmdline hold no value."""

from __future__ import annotations

import json

from harness import (
    Broker,
    HostSecrets,
    cmdline_of,
    environ_of,
    leaked_values,
    needs_root,
    pid_alive,
)

pytestmark = needs_root


def test_broker_environ_is_wiped_and_cmdline_holds_no_value(
    broker: Broker, host_secrets: HostSecrets
) -> None:
    environ = environ_of(broker.pid)  # read as root: only the wipe can hide it from us
    cmdline = cmdline_of(broker.pid)
    everything = [*host_secrets.all_values(), broker.env["UNBROKERED_TOKEN"].encode()]

    assert leaked_values(environ, everything) == [], "a value is still in the broker's environ"
    assert leaked_values(cmdline, everything) == [], "a value is in the broker's cmdline"
    # Contract §2 step 2: the whole original block is overwritten, not only brokered names.
    assert set(environ) <= {0}, f"environ still shows {environ.count(b'=')} variable(s)"


def test_broker_really_holds_the_secrets_it_wiped(broker: Broker) -> None:
    # Guards against a vacuous pass: the wiped environment became exactly four secrets.
    status = broker.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert int(doc["secrets"]) == 4, doc
    for value in broker.env.values():
        if len(value) >= 8:
            assert value not in status.stdout


def test_sigterm_stops_cleanly_and_removes_the_socket(broker: Broker) -> None:
    assert broker.socket.exists()
    assert broker.stop() == 0, broker.log()
    assert not pid_alive(broker.pid)
    assert not broker.socket.exists(), "the socket outlived the broker"
