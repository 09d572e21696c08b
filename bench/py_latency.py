"""Python-side latency, interleaved: what a function pays per read on each path it could use.

    health        grpc.health.v1.Health/Check on the broker socket (grpcio's floor there)
    secretd.get   secretd.Client.get on the same socket (the same HTTP/2 connection)
    dev_shm_file  open + read + decode of the same value from a file on /dev/shm (how Kubernetes,
                  Docker and systemd deliver secrets)
    openbao_kv2   KV v2 GET of the same value from a real OpenBao server on loopback as it is
                  deployed: HTTPS (verified against its CA) with an AppRole token (not the root
                  token), over one keep-alive http.client connection, JSON decoded

Each path gets the same number of calls, in rounds whose order rotates so that noise from the
other tenants of the machine hits every path alike. Used by bench/run.py; not a test.
"""

from __future__ import annotations

import gc
import http.client
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

import secretd
from secretd._common import channel_options


@dataclass(frozen=True)
class OpenBao:
    host: str
    port: int
    token: str
    path: str  # e.g. "/v1/secret/data/bench"
    key: str
    ca_file: str  # the server's CA: HTTPS with verification, as the broker does


def stats(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] / 1000.0

    return {
        "n": n,
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "mean_us": sum(ordered) / n / 1000.0,
        "min_us": ordered[0] / 1000.0,
    }


def measure(
    socket: str,
    name: str,
    expected: str,
    shm_file: str,
    bao: OpenBao | None,
    calls: int,
    rounds: int = 20,
) -> dict[str, dict[str, float]]:
    health_channel = grpc.insecure_channel(f"unix://{socket}", options=channel_options())
    check = health_channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
    )
    client = secretd.Client(socket)

    def read_shm() -> str:
        with open(shm_file, "rb") as f:
            return f.read().decode()

    paths: dict[str, Callable[[], object]] = {
        "health": lambda: check(b"", timeout=5.0),
        "secretd.get": lambda: client.get(name),
        "dev_shm_file": read_shm,
    }
    conn: http.client.HTTPSConnection | None = None
    if bao is not None:
        context = ssl.create_default_context(cafile=bao.ca_file)
        conn = http.client.HTTPSConnection(bao.host, bao.port, timeout=5.0, context=context)
        headers = {"X-Vault-Token": bao.token}

        def read_bao() -> str:
            assert conn is not None
            conn.request("GET", bao.path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"OpenBao GET {bao.path}: HTTP {response.status}")
            value: str = json.loads(body)["data"]["data"][bao.key]
            return value

        paths["openbao_kv2"] = read_bao

    # Every path must return the same secret before anything is timed.
    for label, fn in paths.items():
        if label != "health" and fn() != expected:
            raise RuntimeError(f"{label} returned a different value")
    for fn in paths.values():  # connect and warm up
        for _ in range(300):
            fn()

    samples: dict[str, list[int]] = {k: [] for k in paths}
    order = list(paths)
    per_round = max(1, calls // rounds)
    gc.disable()
    try:
        for r in range(rounds):
            for key in order[r % len(order) :] + order[: r % len(order)]:
                fn, out = paths[key], samples[key]
                for _ in range(per_round):
                    t0 = time.perf_counter_ns()
                    fn()
                    out.append(time.perf_counter_ns() - t0)
    finally:
        gc.enable()
        client.close()
        health_channel.close()
        if conn is not None:
            conn.close()
    return {k: stats(v) for k, v in samples.items()}
