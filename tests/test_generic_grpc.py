"""Generic gRPC tools work against the socket (contract §3): the standard health service says
SERVING and server reflection lists secretd's services. Raw bytes, so no extra packages."""

from __future__ import annotations

import os
from typing import cast

import grpc
import pytest
from harness import Broker, needs_root, wait_until

pytestmark = needs_root

# HealthCheckRequest{service: ""} is the empty message; HealthCheckResponse{status: SERVING}.
SERVING = b"\x08\x01"
# ServerReflectionRequest{list_services: ""}: field 7, length-delimited, empty.
LIST_SERVICES = b"\x3a\x00"


def raw(message: bytes) -> bytes:
    return message


def channel_to(broker: Broker) -> grpc.Channel:
    return grpc.insecure_channel(
        f"unix://{broker.socket}", options=[("grpc.default_authority", "localhost")]
    )


def test_health_service_reports_serving(broker: Broker) -> None:
    with channel_to(broker) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", raw, raw)
        assert check(b"", timeout=10) == SERVING


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_secretd_services(broker: Broker, version: str) -> None:
    """Both reflection versions: grpcurl speaks v1; grpcio's reflection client, grpc_cli and
    several GUI tools speak only v1alpha."""
    with channel_to(broker) as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo", raw, raw
        )
        replies = b"".join(info(iter([LIST_SERVICES]), timeout=10))
    assert b"secretd.v1.Secrets" in replies, replies
    assert b"secretd.v1.Admin" in replies, replies


def send(channel: grpc.Channel, path: str, kind: str, message: bytes) -> list[bytes]:
    if kind == "unary":
        return [channel.unary_unary(path, raw, raw)(message, timeout=10)]
    return list(channel.unary_stream(path, raw, raw)(message, timeout=10))


def test_malformed_request_messages_are_invalid_argument_and_audited(broker: Broker) -> None:
    """Bytes that are no protobuf encoding of the request type: INVALID_ARGUMENT (contract §3),
    one audit record each, the input never echoed, and the broker goes on serving."""
    # A field key of 0 is never valid protobuf; the rest is a value sent by mistake.
    garbage = b"\x00" + b"not-a-request-" + b"\xff" * 8
    calls = {
        "GetSecret": "unary",
        "GetSecrets": "unary",
        "WatchSecret": "stream",
    }
    with channel_to(broker) as channel:
        for rpc, kind in calls.items():
            path = f"/secretd.v1.Secrets/{rpc}"
            with pytest.raises(grpc.RpcError) as raised:
                send(channel, path, kind, garbage)
            error = cast(grpc.Call, raised.value)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, error.details())
            assert error.details().startswith("malformed request message"), error.details()
            assert "not-a-request" not in error.details()
        check = channel.unary_unary("/grpc.health.v1.Health/Check", raw, raw)
        assert check(b"", timeout=10) == SERVING

    def invalid_records() -> list[dict[str, object]]:
        return [r for r in broker.audit_records() if r.get("decision") == "invalid"]

    wait_until(lambda: len(invalid_records()) >= len(calls), 30, "three audit records")
    records = invalid_records()
    assert sorted(str(r["rpc"]) for r in records) == sorted(calls), records
    assert all(r["uid"] == 0 and r["pid"] == os.getpid() for r in records), records
    assert b"not-a-request" not in broker.audit_bytes()
