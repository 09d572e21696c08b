"""Beyond /proc/<pid>/environ: the broker's whole readable memory, read as root through
/proc/<pid>/mem, holds each brokered value exactly once (its store) — also after serving it
many times — and no byte of an environment value it wiped without brokering."""

from __future__ import annotations

from harness import (
    Broker,
    HostSecrets,
    Launcher,
    count_in_memory,
    needs_root,
)

pytestmark = needs_root


def test_broker_memory_holds_one_copy_of_each_value_and_none_of_the_rest(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    brokered = {name: value.encode() for name, value in host_secrets.values.items()}
    wiped = {"UNBROKERED_TOKEN": broker.env["UNBROKERED_TOKEN"].encode()}

    worker = launcher.worker()
    for _ in range(5):
        assert worker.get("ORDERS_DB")["ok"] is True
        assert worker.get_many(["ORDERS_API_TOKEN", "SHARED_CACHE_URL"])["ok"] is True
    worker.exit()

    found = count_in_memory(broker.pid, {**brokered, **wiped})
    assert {name: found[name] for name in brokered} == dict.fromkeys(brokered, 1), found
    assert found["UNBROKERED_TOKEN"] == 0, "a wiped, unbrokered value lingers in memory"
