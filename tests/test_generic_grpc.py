"""Generic gRPC tools work against the socket (contract §3): the standard health service says
SERVING and server reflection lists secretd's services. Raw bytes, so no extra packages."""

from __future__ import annotations

import grpc
from harness import Broker, needs_root

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


def test_reflection_lists_the_secretd_services(broker: Broker) -> None:
    replies = b""
    with channel_to(broker) as channel:
        for version in ("v1", "v1alpha"):
            info = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo", raw, raw
            )
            try:
                replies = b"".join(info(iter([LIST_SERVICES]), timeout=10))
                break
            except grpc.RpcError:
                continue
    assert b"secretd.v1.Secrets" in replies, replies
    assert b"secretd.v1.Admin" in replies, replies
