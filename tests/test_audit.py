"""5. The audit log shows each access with pid, uid, function and decision — never a value."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from harness import (
    WORKER_UID,
    Broker,
    HostSecrets,
    Launcher,
    leaked_values,
    needs_root,
    wait_until,
)

pytestmark = needs_root


def names_of(record: Mapping[str, Any]) -> list[str]:
    for key in ("secrets", "names", "secret_names"):
        if key in record:
            return list(record[key])
    name = record.get("name")
    return [name] if name else []


def test_audit_records_each_access_without_a_value(
    broker: Broker, launcher: Launcher, host_secrets: HostSecrets
) -> None:
    worker = launcher.worker()
    asked = {
        "ORDERS_DB": "allow",
        "BILLING_KEY": "deny",
        "ORDERS_MISSING": "not_found",
        "../ORDERS_DB": "invalid",
    }
    for name in asked:
        # raw: the client would refuse the malformed name before the broker could audit it.
        worker.request({"op": "raw_get", "name": name})
    worker.list()
    worker.exit()

    def get_records() -> list[Mapping[str, Any]]:
        return [
            r
            for r in broker.audit_records()
            if str(r.get("rpc", "")).endswith("GetSecret") and r.get("pid") == worker.pid
        ]

    wait_until(
        lambda: len(get_records()) >= len(asked), 30, "audit records of four GetSecret calls"
    )
    records = get_records()
    dump = json.dumps(records, indent=1)
    assert [r["decision"] for r in records] == list(asked.values()), dump
    for record, name in zip(records, asked):
        # A malformed name may be left out of the record: it could be a value sent by mistake.
        expected = [[name]] if record["decision"] != "invalid" else [[name], []]
        assert names_of(record) in expected, dump

    for record in records:
        assert (record["uid"], record["gid"], record["function"]) == (
            WORKER_UID,
            WORKER_UID,
            "orders",
        )
        datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00"))  # RFC 3339
        if record["decision"] == "deny":
            assert record.get("reason"), f"a denial without a reason: {record}"
        if record["decision"] == "allow":
            assert record.get("scopes") == ["orders"], record

    # The registration itself (Admin.RegisterWorker from the shim) is audited too.
    assert any(str(r.get("rpc", "")).endswith("RegisterWorker") for r in broker.audit_records())

    everything = [*host_secrets.all_values(), broker.env["UNBROKERED_TOKEN"].encode()]
    assert leaked_values(broker.audit_bytes(), everything) == [], "a value in the audit log"
    assert leaked_values(broker.log().encode(), everything) == [], "a value in the broker's log"
