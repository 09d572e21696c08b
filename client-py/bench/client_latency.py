"""Latency of `secretd.get` against a plain grpcio call on the same socket, in the same run.

    .venv/bin/python client-py/bench/client_latency.py [--socket PATH] [-n 5000]

Without --socket it starts a broker of its own (client-py/tests/broker_process.py; the binary
from $SECRETD_BIN_DIR, else the newest target/ build). Three calls are timed, one of each in
turn, so that noise from the rest of the machine hits all of them alike:

  health   raw grpc.health.v1.Health/Check (empty request, bytes in/out): the gRPC floor
  raw-get  GetSecret through the generated stub: the floor plus the broker's own work
  get      secretd.Client.get: raw-get plus the client (name check, retry wrapper, decode)

The target is p50(get) <= 1.3 x p50(health). Not a test: nothing is gated on the numbers.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import pathlib
import sys
import time
from typing import Any, Callable

import grpc

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import secretd  # noqa: E402
from secretd._common import channel_options  # noqa: E402
from secretd._proto import secretd_pb2 as pb  # noqa: E402
from secretd._proto import secretd_pb2_grpc as pb_grpc  # noqa: E402

# The client's own channel options: equal options to the same target share grpcio's subchannel,
# so all three calls travel over one connection and differ only in what they do.
OPTIONS = channel_options()
NAME = "APP_DB"


def percentile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0  # ns -> us


def measure(sock: str, n: int) -> dict[str, list[int]]:
    health_channel = grpc.insecure_channel(f"unix://{sock}", options=OPTIONS)
    check = health_channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
    )
    raw_channel = grpc.insecure_channel(f"unix://{sock}", options=OPTIONS)
    raw_stub = pb_grpc.SecretsStub(raw_channel)  # type: ignore[no-untyped-call]
    request = pb.GetSecretRequest(name=NAME)
    client = secretd.Client(sock)

    calls: dict[str, Callable[[], object]] = {
        "health": lambda: check(b"", timeout=5.0),
        "raw-get": lambda: raw_stub.GetSecret(request, timeout=5.0),
        "get": lambda: client.get(NAME),
    }
    for fn in calls.values():  # connect and warm up
        for _ in range(300):
            fn()
    samples: dict[str, list[int]] = {k: [] for k in calls}
    order = list(calls)
    gc.disable()
    try:
        # One call of each kind in turn (starting with a different kind each time), so that
        # noise from the rest of the machine lands on all three alike.
        for i in range(n):
            for key in order[i % 3 :] + order[: i % 3]:
                fn = calls[key]
                t0 = time.perf_counter_ns()
                fn()
                samples[key].append(time.perf_counter_ns() - t0)
    finally:
        gc.enable()
    client.close()
    raw_channel.close()
    health_channel.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="a running broker's socket (must serve APP_DB to you)")
    parser.add_argument("-n", type=int, default=5000, help="calls per kind (default 5000)")
    args = parser.parse_args()

    broker: Any = None
    sock = args.socket
    if sock is None:
        broker = importlib.import_module("broker_process").Broker()
        broker.start()
        sock = broker.socket
        print(f"broker: {broker.binary}", file=sys.stderr)
    try:
        samples = measure(sock, args.n)
    finally:
        if broker is not None:
            broker.stop()

    print(f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, pid {os.getpid()}")
    print(f"{'call':<8} {'n':>6} {'p50 us':>9} {'p99 us':>9}")
    for key, values in samples.items():
        p50, p99 = percentile(values, 0.50), percentile(values, 0.99)
        print(f"{key:<8} {len(values):>6} {p50:>9.1f} {p99:>9.1f}")
    h50, h99 = percentile(samples["health"], 0.5), percentile(samples["health"], 0.99)
    g50, g99 = percentile(samples["get"], 0.5), percentile(samples["get"], 0.99)
    r50 = percentile(samples["raw-get"], 0.5)
    print(f"ratio get/health: p50 {g50 / h50:.2f}x (target <= 1.30x), p99 {g99 / h99:.2f}x")
    print(f"ratio get/raw-get: p50 {g50 / r50:.2f}x (the client's own overhead)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
